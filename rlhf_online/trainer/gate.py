"""The eval gate: a new policy version is published only if it is sane, better, and close to the reference.

Both the serving version and the candidate answer the same held-out prompts with the same sampling seeds (a
paired comparison), and the same reward model scores both. The candidate passes when
1. every weight is finite,
2. mean score(candidate) > mean score(serving) + margin (an unchanged policy is not republished),
3. KL(candidate || reference), summed over response tokens and averaged over responses, is at most a bound.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_online.contract import RoundFigure
from rlhf_online.trainer.ppo import kl_estimate, masked_sum
from rlhf_online.trainer.rollout import logprobs_with_reference, sample_rollouts

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> (B,) scores


@dataclass
class EvalResult:
    """How one policy does on the held-out prompts."""

    mean_score: float  # mean reward-model score
    kl_to_reference: float  # mean over responses of sum_t k3(policy || reference), nats
    mean_response_tokens: float
    n: int  # responses scored
    generate_s: float = 0.0  # time spent sampling the answers
    prompts: list[str] = field(default_factory=list, repr=False)  # (n,) the held-out prompt of each answer
    responses: list[str] = field(default_factory=list, repr=False)  # (n,) the answers, kept to re-score

    def rescored(self, reward_fn: RewardFn) -> "EvalResult":
        """The same answers scored by `reward_fn`: a version's answers at the gate's fixed seed do not change
        between rounds, only the reward model does, so the gate need not sample them again."""
        scores = reward_fn(self.prompts, self.responses).float()  # (n,)
        return replace(self, mean_score=scores.mean().item(), generate_s=0.0)


@dataclass
class GateDecision:
    """The gate's verdict and the figures behind it (they go into the manifest and the ModelEvent)."""

    passed: bool
    reason: str  # "passed", or why not, in words
    code: str  # "passed" | "non_finite" | "no_improvement" | "kl_too_large" (a metric label)
    candidate_score: float
    serving_score: float
    improvement: float
    kl_to_reference: float
    margin: float
    max_kl: float

    def figures(self) -> dict[str, float]:
        """The numeric fields, for manifests, ModelEvents, RoundEvents and logs (`RoundFigure` names)."""
        return {
            "gate_passed": float(self.passed),
            RoundFigure.GATE_CANDIDATE_SCORE: self.candidate_score,
            RoundFigure.GATE_SERVING_SCORE: self.serving_score,
            RoundFigure.GATE_IMPROVEMENT: self.improvement,
            RoundFigure.GATE_KL_TO_REFERENCE: self.kl_to_reference,
            "gate_margin": float(self.margin),
            "gate_max_kl": float(self.max_kl),
        }


@torch.no_grad()
def evaluate_policy(
    lm: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    reward_fn: RewardFn,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    max_prompt_tokens: int,
    batch_size: int,
    seed: int,
) -> EvalResult:
    """Samples `samples_per_prompt` answers per held-out prompt with fixed seeds, scores them, measures KL."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    t0 = time.perf_counter()
    rollouts = sample_rollouts(
        lm,
        tokenizer,
        repeated,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    generate_s = time.perf_counter() - t0
    scores = reward_fn(rollouts.prompts, rollouts.responses).float()  # (B,)
    logprobs, ref_logprobs = logprobs_with_reference(
        lm, reference, rollouts, temperature, batch_size
    )  # (B, T)
    kl = masked_sum(kl_estimate(logprobs, ref_logprobs, "k3"), rollouts.response_mask, dim=1)  # (B,)
    return EvalResult(
        mean_score=scores.mean().item(),
        kl_to_reference=kl.mean().item(),
        mean_response_tokens=rollouts.response_mask.sum(dim=1).mean().item(),
        n=len(rollouts),
        generate_s=generate_s,
        prompts=list(rollouts.prompts),
        responses=list(rollouts.responses),
    )


def decide(
    candidate: EvalResult | None,
    serving: EvalResult,
    *,
    non_finite: list[str],
    margin: float,
    max_kl: float,
) -> GateDecision:
    """Applies the three checks in order; `candidate` is None when its weights were not finite."""
    cand_score = candidate.mean_score if candidate else math.nan
    kl = candidate.kl_to_reference if candidate else math.nan
    improvement = cand_score - serving.mean_score

    def verdict(passed: bool, code: str, reason: str) -> GateDecision:
        return GateDecision(
            passed, reason, code, cand_score, serving.mean_score, improvement, kl, margin, max_kl
        )

    if non_finite or candidate is None or not math.isfinite(cand_score) or not math.isfinite(kl):
        shown = ", ".join(non_finite[:3]) + (" ..." if len(non_finite) > 3 else "")
        return verdict(False, "non_finite", f"non-finite weights or figures ({shown or 'score/KL is NaN'})")
    if not improvement > margin:
        return verdict(
            False,
            "no_improvement",
            f"mean reward {cand_score:.4f} does not beat serving {serving.mean_score:.4f} by margin {margin}",
        )
    if kl > max_kl:
        return verdict(False, "kl_too_large", f"KL to reference {kl:.3f} nats exceeds the bound {max_kl}")
    return verdict(True, "passed", f"mean reward {cand_score:.4f} vs {serving.mean_score:.4f}, KL {kl:.3f}")
