"""KL coefficient controllers: the beta in reward = score - beta * KL(policy || reference).

Both share one method, `update(current_kl, n_steps)`, called once per PPO round with the measured KL
(OpenRLHF `ppo_utils/kl_controller.py`, TRL's old `AdaptiveKLController`).
"""

from dataclasses import dataclass


@dataclass
class FixedKLController:
    """beta never changes."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""


@dataclass
class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards `target` (Ziegler et al. 2019, sec. 2.2).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon).
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        """Moves beta up when KL is above target, down when below, by at most 20% per horizon of steps."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kind: str, init_coef: float, target: float, horizon: int) -> KLController:
    """`kind` is "fixed" or "adaptive"."""
    if kind == "fixed":
        return FixedKLController(init_coef)
    if kind == "adaptive":
        return AdaptiveKLController(init_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; use 'fixed' or 'adaptive'")
