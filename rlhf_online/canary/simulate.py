"""Many canary trials at once, without services: Bernoulli thumbs in a random interleaving of the two arms.

Each rating lands on the canary arm with probability `canary_share` (the traffic split), is a thumbs up with
that arm's rate, and the trial is checked after every rating with the same rules as a live trial
(`decision.verdict` on `stats.confidence_sequence`). Trials run side by side in numpy, a block of ratings at a
time, until each has decided or timed out (the canary arm reaching max_canary_ratings bounds every trial).
"""

from dataclasses import dataclass

import numpy as np

from rlhf_online.canary import stats
from rlhf_online.canary.decision import CONTINUE, CanaryConfig, verdict


@dataclass
class Outcomes:
    """How simulated trials ended, one entry per trial."""

    code: np.ndarray  # (N,) int: NON_INFERIOR, INFERIOR or TIMED_OUT_RATINGS
    canary_ratings: np.ndarray  # (N,) ratings of the canary arm when decided
    ratings: np.ndarray  # (N,) ratings of both arms when decided


def scan(config: CanaryConfig, canary: np.ndarray, up: np.ndarray, counts: np.ndarray):
    """Runs trials over one block of ratings, checking after each; where each first decided.

    Args:
        canary: (M, T) bool, rating t of trial m is on the canary arm.
        up: (M, T) bool, it is a thumbs up.
        counts: (M, 4) int, [canary ratings, canary ups, stable ratings, stable ups] before the block.

    Returns:
        code: (M,) the first verdict other than CONTINUE in the block, CONTINUE if none.
        step: (M,) its index in the block, T - 1 where none.
        counts: (M, 4) the counts after that rating (after the block where none).
    """
    arms = (canary, canary & up, ~canary, ~canary & up)
    cum = np.stack([np.cumsum(a, 1, dtype=np.int64) for a in arms], -1) + counts[:, None, :]  # (M, T, 4)
    n_c, ups_c, n_s, ups_s = np.moveaxis(cum, -1, 0)  # each (M, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, lower, upper = stats.confidence_sequence(
            ups_c, np.maximum(n_c, 1), ups_s, np.maximum(n_s, 1), config.alpha, config.tau
        )  # (M, T) each
    codes = verdict(config, lower, upper, n_c, n_s)  # (M, T)
    decided = codes != CONTINUE
    step = np.where(decided.any(1), decided.argmax(1), canary.shape[1] - 1)  # (M,)
    rows = np.arange(len(step))
    return codes[rows, step], step, cum[rows, step]


def simulate_trials(
    config: CanaryConfig,
    p_stable: float,
    p_canary: float,
    canary_share: float,
    trials: int,
    rng: np.random.Generator,
    block: int = 1024,
) -> Outcomes:
    """Runs `trials` independent trials to their end.

    Args:
        p_stable, p_canary: the arms' true thumbs-up rates.
        canary_share: probability that a rating is on the canary arm, in (0, 1).
        block: ratings drawn per trial per step (memory: about 100 bytes x trials x block).
    """
    if not 0.0 < canary_share < 1.0:
        raise ValueError(f"canary_share must be in (0, 1), got {canary_share}")
    code = np.zeros(trials, dtype=int)
    counts = np.zeros((trials, 4), dtype=np.int64)
    active = np.arange(trials)
    while active.size:
        canary = rng.random((active.size, block)) < canary_share
        up = rng.random((active.size, block)) < np.where(canary, p_canary, p_stable)
        block_code, _, counts[active] = scan(config, canary, up, counts[active])
        code[active] = block_code
        active = active[block_code == CONTINUE]
    return Outcomes(code=code, canary_ratings=counts[:, 0], ratings=counts[:, 0] + counts[:, 2])
