"""One PPO round end to end, without Kafka: rollouts -> scores -> PPO updates -> eval gate.

    policy = build_policy(folder, train_mode="top_layers", trainable_layers=2)
    result = run_round(policy, reference, tokenizer, reward_fn, train_prompts, eval_prompts, config, kl_ctl,
                       seed=0)
    if result.decision.passed:
        publish_policy(registry, result, ...)

Steps (Ouyang et al. 2022, sec. 3.5; TRL PPOTrainer.train):
1. evaluate the starting (serving) policy on the held-out prompts;
2. sample responses to training prompts from the policy;
3. score them with the reward model; log-probs of policy and reference, values;
4. per-token rewards (-beta KL, score at the last token), GAE advantages and returns, whitening;
5. `ppo_epochs` passes of clipped PPO updates over shuffled minibatches, gradient clipping;
6. merge (LoRA) and evaluate the candidate with the same prompts and seeds; the gate decides.
"""

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_online.registry import Manifest, Registry
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import EvalResult, GateDecision, RewardFn, decide, evaluate_policy
from rlhf_online.trainer.kl import KLController
from rlhf_online.trainer.policy import (
    VALUE_HEAD_FILE,
    PolicyWithValueHead,
    export_model,
    non_finite_parameters,
    value_head_bytes,
)
from rlhf_online.trainer.ppo import (
    compute_rewards,
    gae_advantages,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_loss,
)
from rlhf_online.trainer.rollout import Rollouts, policy_outputs, response_logprobs, sample_rollouts

log = logging.getLogger(__name__)


class RoundAbandoned(Exception):
    """The round was stopped (shutdown) or went stale (serving moved); nothing was published."""


@dataclass
class Experience:
    """Everything PPO needs about one round's rollouts; fields (B, T) unless noted."""

    rollouts: Rollouts
    scores: torch.Tensor  # (B,) reward-model scores
    logprobs: torch.Tensor  # log pi_old(a_t | s_t)
    ref_logprobs: torch.Tensor  # log pi_ref(a_t | s_t)
    values: torch.Tensor  # V_old(s_t)
    rewards: torch.Tensor  # -beta KL_t, plus the score at the last token
    kl: torch.Tensor  # per-token KL estimate (policy || reference)
    advantages: torch.Tensor  # GAE, whitened if configured
    returns: torch.Tensor  # value targets


@dataclass
class RoundResult:
    """What a finished round produced; `model` is the merged candidate (publish it only if it passed)."""

    model: PreTrainedModel
    value_head: bytes  # safetensors of the value head
    decision: GateDecision
    serving_eval: EvalResult
    candidate_eval: EvalResult | None
    stats: dict[str, float] = field(default_factory=dict)  # losses, KL, reward, clip fractions, timings

    def metrics(self) -> dict[str, float]:
        """Gate figures plus round stats, the numbers recorded in the manifest and the ModelEvent."""
        return {**self.decision.figures(), **self.stats}


def pick_prompts(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n prompts from `pool`: without replacement when it is large enough, with replacement otherwise."""
    if not pool:
        raise ValueError("no training prompts; wait for interactions or pass --prompt-file")
    return rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n)


@torch.no_grad()
def make_experience(
    policy: PolicyWithValueHead,
    reference: nn.Module,
    rollouts: Rollouts,
    scores: torch.Tensor,
    config: TrainerConfig,
    kl_coef: float,
) -> Experience:
    """Old log-probs and values of the policy, reference log-probs, then rewards, GAE and whitening."""
    policy.eval()
    logprobs, values = [], []
    for start in range(0, len(rollouts), config.minibatch_size):
        chunk = rollouts.select(torch.arange(start, min(start + config.minibatch_size, len(rollouts))))
        lp, v, _ = policy_outputs(policy, chunk, config.temperature)
        logprobs.append(lp * chunk.response_mask)
        values.append(v * chunk.response_mask)
    logprobs_t, values_t = torch.cat(logprobs), torch.cat(values)  # (B, T)
    ref_logprobs = response_logprobs(reference, rollouts, config.temperature, config.minibatch_size)  # (B, T)
    mask = rollouts.response_mask
    rewards, kl = compute_rewards(scores, logprobs_t, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae_advantages(rewards, values_t, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(rollouts, scores, logprobs_t, ref_logprobs, values_t, rewards, kl, advantages, returns)


def ppo_update(
    policy: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    config: TrainerConfig,
    generator: torch.Generator,
    should_stop: Callable[[], bool],
    name: str,
) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches of `exp`; returns the mean of each logged figure."""
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    logged: dict[str, list[float]] = defaultdict(list)
    B = len(exp.rollouts)
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, config.minibatch_size):
            if should_stop():
                raise RoundAbandoned(f"{name}: stopped during PPO epoch {epoch + 1}")
            idx = order[start : start + config.minibatch_size]
            mb = exp.rollouts.select(idx)
            logprobs, values, entropy = policy_outputs(policy, mb, config.temperature)  # (b, T) each
            terms = ppo_loss(
                logprobs,
                values,
                entropy,
                old_logprobs=exp.logprobs[idx],
                old_values=exp.values[idx],
                advantages=exp.advantages[idx],
                returns=exp.returns[idx],
                mask=mb.response_mask,
                clip_range=config.clip_range,
                clip_range_value=config.clip_range_value,
                vf_coef=config.vf_coef,
                ent_coef=config.ent_coef,
            )
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            for key in ("loss", "pg_loss", "v_loss", "entropy", "clip_frac", "v_clip_frac", "approx_kl"):
                logged[key].append(getattr(terms, key).item())
            logged["grad_norm"].append(grad_norm.item())
        log.info(
            "%s: PPO epoch %d/%d pg_loss %.4f v_loss %.4f clip_frac %.3f approx_kl %.4f",
            name,
            epoch + 1,
            config.ppo_epochs,
            _last_mean(logged["pg_loss"], B, config),
            _last_mean(logged["v_loss"], B, config),
            _last_mean(logged["clip_frac"], B, config),
            _last_mean(logged["approx_kl"], B, config),
        )
    policy.eval()
    return {key: sum(v) / len(v) for key, v in logged.items()}


def _last_mean(values: list[float], B: int, config: TrainerConfig) -> float:
    """Mean over the minibatches of the last epoch."""
    per_epoch = -(-B // config.minibatch_size)
    tail = values[-per_epoch:]
    return sum(tail) / len(tail)


def run_round(
    policy: PolicyWithValueHead,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    reward_fn: RewardFn,
    train_prompts: list[str],
    eval_prompts: list[str],
    config: TrainerConfig,
    kl_ctl: KLController,
    *,
    seed: int,
    should_stop: Callable[[], bool] = lambda: False,
    name: str = "round",
) -> RoundResult:
    """Runs one round on `policy` (trained in place) and returns the merged candidate and the gate's verdict.

    Raises:
        RoundAbandoned: `should_stop()` turned true; the caller must not publish anything.
        ValueError: no prompts, or the reward model returned non-finite scores.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def check_stop(stage: str) -> None:
        if should_stop():
            raise RoundAbandoned(f"{name}: stopped before {stage}")

    eval_kwargs = dict(
        samples_per_prompt=config.eval_samples_per_prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        max_prompt_tokens=config.max_prompt_tokens,
        batch_size=config.generation_batch_size,
        seed=config.eval_seed,
    )
    if not eval_prompts:
        raise ValueError("no held-out prompts for the eval gate")
    # 1. the serving version, on the held-out prompts
    t0 = time.perf_counter()
    serving_eval = evaluate_policy(policy.lm, reference, tokenizer, reward_fn, eval_prompts, **eval_kwargs)
    timings["eval_serving_s"] = time.perf_counter() - t0
    log.info(
        "%s: serving policy scores %.4f on %d held-out answers (%.1fs)",
        name,
        serving_eval.mean_score,
        serving_eval.n,
        timings["eval_serving_s"],
    )
    check_stop("rollouts")

    # 2. rollouts
    prompts = pick_prompts(train_prompts, config.rollouts_per_round, random.Random(seed))
    t0 = time.perf_counter()
    rollouts = sample_rollouts(
        policy.lm,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        max_prompt_tokens=config.max_prompt_tokens,
        batch_size=config.generation_batch_size,
        seed=seed,
    )
    timings["generate_s"] = time.perf_counter() - t0
    log.info(
        "%s: sampled %d rollouts in %.1fs (%.1f rollouts/s, mean %.1f tokens)",
        name,
        len(rollouts),
        timings["generate_s"],
        len(rollouts) / timings["generate_s"],
        rollouts.response_mask.sum(dim=1).mean().item(),
    )
    check_stop("scoring")

    # 3. scores, log-probs, values; 4. rewards and advantages
    t0 = time.perf_counter()
    device = rollouts.response_ids.device
    scores = reward_fn(rollouts.prompts, rollouts.responses).detach().float().reshape(-1).to(device)  # (B,)
    if scores.shape[0] != len(rollouts) or not torch.isfinite(scores).all():
        raise ValueError(
            f"{name}: the reward model returned {scores.shape[0]} scores with non-finite values "
            f"for {len(rollouts)} responses; check the reward checkpoint"
        )
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exp = make_experience(policy, reference, rollouts, scores, config, kl_ctl.value)
    timings["experience_s"] = time.perf_counter() - t0
    mask = rollouts.response_mask
    kl_per_response = masked_sum(exp.kl, mask, dim=1).mean().item()
    log.info(
        "%s: reward mean %.4f (std %.4f), KL to reference %.3f nats/response, beta %.4f",
        name,
        scores.mean().item(),
        scores.std().item(),
        kl_per_response,
        kl_ctl.value,
    )
    check_stop("PPO updates")

    # 5. PPO
    t0 = time.perf_counter()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, eps=1e-5, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ppo_stats = ppo_update(policy, optimizer, exp, config, generator, should_stop, name)
    timings["train_s"] = time.perf_counter() - t0
    kl_coef_used = kl_ctl.value
    kl_ctl.update(kl_per_response, len(rollouts))
    check_stop("the eval gate")

    # 6. merge, check, evaluate, decide
    t0 = time.perf_counter()
    head = value_head_bytes(policy)
    model = export_model(policy)
    bad = non_finite_parameters(model)
    candidate_eval = None
    if not bad:
        candidate_eval = evaluate_policy(model, reference, tokenizer, reward_fn, eval_prompts, **eval_kwargs)
    timings["eval_candidate_s"] = time.perf_counter() - t0
    decision = decide(
        candidate_eval, serving_eval, non_finite=bad, margin=config.gate_margin, max_kl=config.gate_max_kl
    )
    timings["round_s"] = time.perf_counter() - t_start
    timings["eval_generate_s"] = serving_eval.generate_s + (
        candidate_eval.generate_s if candidate_eval else 0.0
    )
    sampling_s = timings["generate_s"] + timings["eval_generate_s"]
    training_s = timings["experience_s"] + timings["train_s"]
    stats = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl_per_response": kl_per_response,
        "kl_coef": kl_coef_used,
        "kl_coef_next": kl_ctl.value,
        "response_tokens_mean": mask.sum(dim=1).mean().item(),
        "advantage_mean_raw": masked_mean(exp.returns - exp.values, mask).item(),
        "rollouts": float(len(rollouts)),
        "rollouts_per_s": len(rollouts) / timings["generate_s"],
        "share_generating": sampling_s / timings["round_s"],
        "share_training": training_s / timings["round_s"],
        **{f"ppo_{k}": v for k, v in ppo_stats.items()},
        **timings,
    }
    log.info(
        "%s: gate %s: %s (round %.1fs: %.0f%% sampling, %.0f%% training, the rest scoring and eval)",
        name,
        "PASSED" if decision.passed else "REJECTED",
        decision.reason,
        timings["round_s"],
        100 * stats["share_generating"],
        100 * stats["share_training"],
    )
    return RoundResult(model, head, decision, serving_eval, candidate_eval, stats)


def publish_policy(
    registry: Registry,
    result: RoundResult,
    tokenizer: PreTrainedTokenizerBase,
    *,
    parent_version: str,
    reward_version: str | None,
    reference_version: str,
    extra: dict | None = None,
) -> Manifest:
    """Publishes a candidate that passed the gate as the next policy version (atomic, checksummed)."""
    if not result.decision.passed:
        raise ValueError(f"refusing to publish a policy that failed the gate: {result.decision.reason}")
    return registry.publish_model(
        "policy",
        result.model,
        tokenizer,
        extra_files={VALUE_HEAD_FILE: result.value_head},
        parent_version=parent_version,
        metrics=result.metrics(),
        extra={
            "reward_version": reward_version,
            "reference_version": reference_version,
            "gate": {"reason": result.decision.reason, **result.decision.figures()},
            **(extra or {}),
        },
    )
