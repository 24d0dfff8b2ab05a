"""PPO for language models as short pure functions on tensors.

Shapes: B = rollouts in the batch, T = response tokens (right-padded after the first end-of-sequence),
V = vocabulary.
`mask` is 1.0 on real response tokens (the end-of-sequence token included) and 0.0 on padding.

Sources:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, arXiv:1707.06347).
- Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv:1506.02438).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593) and
  Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155): reward = RM score - beta * KL(policy || reference).
- TRL `PPOTrainer` (trl/trainer/ppo_trainer.py, trl/trainer/utils.py): per-token reward -beta * KL_t with the
  score added at the last response token, masked whitening, clipped value loss.
- J. Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html): the k1 and k3 estimators.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k3")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(label | context) for every position.

    Args:
        logits: (B, T, V) unnormalised scores that predict `labels`.
        labels: (B, T) token ids.
    Returns:
        (B, T) log-probabilities.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: logsumexp(z) - sum softmax(z) * z.

    Args:
        logits: (B, T, V).
    Returns:
        (B, T) entropy in nats.
    """
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)  # (B, T)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over `dim`, or everything)."""
    return (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything); 0 where the mask is empty."""
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(values, mask, dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries, with Bessel's correction as in TRL's `masked_var`."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding stays 0 (TRL `masked_whiten`).

    Args:
        values: (B, T).
        mask: (B, T).
        shift_mean: when False the mean is added back (only the scale changes).
    Returns:
        (B, T) whitened values, 0 on padding.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, always >= 0, lower variance). See Schulman's note.

    Args:
        logprobs: (B, T) log pi(a_t | s_t) of the sampled tokens.
        ref_logprobs: (B, T) log pi_ref(a_t | s_t) of the same tokens.
        kind: "k1" or "k3".
    Returns:
        (B, T) per-token KL estimates.
    """
    log_ratio = ref_logprobs - logprobs  # (B, T) log r
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded mask; (B, T) -> (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values  # (B,)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t at every token, plus the reward-model score at the last response token.

    This is the InstructGPT / TRL PPOTrainer convention (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019):
    the sequence-level objective is RM(x, y) - beta * KL(pi(y|x) || pi_ref(y|x)), spread over tokens.

    Args:
        scores: (B,) reward-model scores of the whole responses.
        logprobs: (B, T) log pi of the sampled tokens (before the update).
        ref_logprobs: (B, T) log pi_ref of the same tokens.
        mask: (B, T) 1.0 on response tokens.
        kl_coef: beta.
        kl_kind: "k1" or "k3".
    Returns:
        rewards: (B, T), 0 on padding.
        kl: (B, T) per-token KL estimates, 0 on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_kind) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(mask)  # (B,)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, A_t = sum_l (gamma lam)^l delta_{t+l}, an estimate of Q(s,a) - V(s).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the last response token (the episode ends
    there). Schulman et al. 2016, eq. 16; the backward loop of CleanRL's ppo.py and TRL's PPOTrainer.

    Args:
        rewards: (B, T) per-token rewards, 0 on padding.
        values: (B, T) V(s_t) from the value head at the state before token t.
        mask: (B, T) 1.0 on response tokens (right-padded).
        gamma: discount.
        lam: GAE lambda.
    Returns:
        advantages: (B, T), 0 on padding.
        returns: (B, T) advantages + values, the value-head targets.
    """
    values = values * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages = torch.zeros_like(rewards)  # (B, T)
    for t in reversed(range(T)):
        # 0 when token t is the last one (or padding): nothing is bootstrapped past the end of the episode
        not_done = mask[:, t + 1] if t < T - 1 else torch.zeros_like(last_gae)  # (B,)
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_values * not_done - values[:, t]
        last_gae = delta + gamma * lam * not_done * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective as a loss: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old.

    Schulman et al. 2017, eq. 7; `pg_loss` in CleanRL and TRL.

    Args:
        logprobs: (B, T) log pi of the sampled tokens under the current parameters.
        old_logprobs: (B, T) the same under the parameters that sampled them.
        advantages: (B, T) (whitened) advantages.
        mask: (B, T).
        clip_range: epsilon.
    Returns:
        loss: () scalar to minimise.
        clip_frac: () share of tokens where the clipped term was taken.
        approx_kl: () k3 estimate of KL(pi_old || pi) (CleanRL's `approx_kl`).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    The clipped value objective of OpenAI baselines' ppo2, as in TRL's PPOTrainer and CleanRL (`clip_vloss`).

    Args:
        values: (B, T) V(s_t) under the current parameters.
        old_values: (B, T) V(s_t) at rollout time.
        returns: (B, T) GAE returns (targets).
        mask: (B, T).
        clip_range_value: epsilon for the value.
    Returns:
        loss: () scalar to minimise.
        clip_frac: () share of tokens where the clipped term was taken.
    """
    values_clipped = torch.clamp(
        values, old_values - clip_range_value, old_values + clip_range_value
    )  # (B, T)
    losses = (values - returns) ** 2  # (B, T)
    losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, clip_frac


@dataclass
class LossTerms:
    """One minibatch's PPO loss and the figures logged with it."""

    loss: torch.Tensor  # () total: pg_loss + vf_coef * v_loss - ent_coef * entropy
    pg_loss: torch.Tensor  # ()
    v_loss: torch.Tensor  # ()
    entropy: torch.Tensor  # () mean per-token entropy
    clip_frac: torch.Tensor  # ()
    v_clip_frac: torch.Tensor  # ()
    approx_kl: torch.Tensor  # ()


def ppo_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
    vf_coef: float,
    ent_coef: float,
) -> LossTerms:
    """Total PPO loss, L = L_clip + c1 L_V - c2 H (Schulman et al. 2017, eq. 9); all inputs (B, T)."""
    pg, clip_frac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    v, v_clip_frac = value_loss(values, old_values, returns, mask, clip_range_value)
    ent = masked_mean(entropy, mask)
    loss = pg + vf_coef * v - ent_coef * ent
    return LossTerms(loss, pg, v, ent, clip_frac, v_clip_frac, approx_kl)
