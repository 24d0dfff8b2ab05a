"""Reward model losses and held-out figures, as short pure functions on tensors.

The score s(x, y) of a response y to a prompt x is a logit: P(thumbs up | x, y) = sigmoid(s). Two losses:
- pointwise logistic loss on single ratings (binary cross-entropy on the logit), class-weighted so a skewed
  up/down ratio does not teach the model to predict the majority;
- Bradley-Terry pairwise loss -log sigmoid(s_up - s_down) when the same prompt has both an up and a down
  response (Bradley & Terry 1952; Ouyang et al. 2022, "Training language models to follow instructions",
  eq. 1).
"""

import math

import torch
import torch.nn.functional as F


def class_weights(n_up: int, n_down: int) -> tuple[float, float]:
    """Weights (w_up, w_down) that make both classes count equally: w_c = N / (2 N_c) (the "balanced"
    heuristic of King & Zeng 2001, as in scikit-learn). (1, 1) until both classes were seen."""
    if n_up == 0 or n_down == 0:
        return 1.0, 1.0
    total = n_up + n_down
    return total / (2 * n_up), total / (2 * n_down)


def pointwise_logistic_loss(
    scores: torch.Tensor, labels: torch.Tensor, w_up: float = 1.0, w_down: float = 1.0
) -> torch.Tensor:
    """Class-weighted mean binary cross-entropy of logits against 0/1 labels.

    Args:
        scores: (B,) logits s.
        labels: (B,) 1.0 for thumbs up, 0.0 for thumbs down.
        w_up, w_down: class weights (see `class_weights`).
    Returns:
        scalar sum_i w_i * BCE(s_i, y_i) / sum_i w_i.
    """
    weights = labels * w_up + (1.0 - labels) * w_down  # (B,)
    per_example = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")  # (B,)
    return (weights * per_example).sum() / weights.sum()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(s_chosen - s_rejected) over pairs (Ouyang et al. 2022, eq. 1).

    Args:
        chosen: (P,) scores of thumbs-up responses.
        rejected: (P,) scores of thumbs-down responses to the same prompts.
    """
    return -F.logsigmoid(chosen - rejected).mean()


def preference_pairs(
    prompts: list[str], labels: list[float], max_per_prompt: int = 4
) -> list[tuple[int, int]]:
    """Index pairs (i_up, j_down) of examples in a batch that share a prompt and disagree in label.

    At most `max_per_prompt` pairs per prompt, so one popular prompt does not dominate the pairwise loss.
    """
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for i, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        ups, downs = by_prompt.setdefault(prompt, ([], []))
        (ups if label >= 0.5 else downs).append(i)
    pairs = []
    for ups, downs in by_prompt.values():
        pairs += [(i, j) for i in ups for j in downs][:max_per_prompt]
    return pairs


def reward_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    pairs: list[tuple[int, int]],
    w_up: float = 1.0,
    w_down: float = 1.0,
    pairwise_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """pointwise loss + pairwise_coef * Bradley-Terry loss over `pairs`; returns the loss and its parts."""
    pointwise = pointwise_logistic_loss(scores, labels, w_up, w_down)
    loss = pointwise
    stats = {"pointwise_loss": pointwise.item(), "pairs": float(len(pairs))}
    if pairs and pairwise_coef > 0:
        up, down = (torch.tensor(idx, device=scores.device) for idx in zip(*pairs, strict=True))
        pairwise = bradley_terry_loss(scores[up], scores[down])
        loss = loss + pairwise_coef * pairwise
        stats["pairwise_loss"] = pairwise.item()
    stats["loss"] = loss.item()
    return loss, stats


# ---- held-out figures --------------------------------------------------------------------------------------


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples where sigmoid(s) > 0.5 agrees with the rating."""
    return ((scores > 0).float() == labels).float().mean().item()


def log_loss(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean binary cross-entropy (nats)."""
    return F.binary_cross_entropy_with_logits(scores, labels).item()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(s_up > s_down) over all (up, down) pairs, ties counting 1/2
    (the Mann-Whitney U statistic / (n_up n_down)). NaN when one class is absent."""
    up = scores[labels >= 0.5]  # (U,)
    down = scores[labels < 0.5]  # (D,)
    if len(up) == 0 or len(down) == 0:
        return math.nan
    diff = up[:, None] - down[None, :]  # (U, D)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
