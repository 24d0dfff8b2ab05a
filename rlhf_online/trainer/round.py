"""One PPO round end to end, without Kafka or the registry: rollouts -> scores -> PPO updates -> eval gate.

    policy = build_policy(folder, train_mode="top_layers", trainable_layers=2)
    result = run_round(policy, reference, tokenizer, reward_fn, train_prompts, eval_prompts, config, kl_ctl,
                       seed=0)
    if result.decision.passed:
        publish_policy(registry, result, ...)      # rlhf_online.trainer.publish

Steps (Ouyang et al. 2022, sec. 3.5; TRL PPOTrainer.train), one function each:
1. `evaluate_serving`: the starting (serving) policy on the held-out prompts;
2. `collect_experience`: sample responses to training prompts from the policy, score them with the reward
   model, then `make_experience`: log-probs of policy and reference, values, per-token rewards (-beta KL,
   the score at the last token), GAE advantages and returns, whitening;
3. `train`: `ppo_epochs` passes of clipped PPO updates over shuffled minibatches, gradient clipping;
4. `gate`: merge (LoRA), check the weights, evaluate the candidate with the same prompts and seeds; decide.
"""

import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_online.contract import RoundFigure
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import EvalResult, GateDecision, RewardFn, decide, evaluate_policy
from rlhf_online.trainer.kl import KLController
from rlhf_online.trainer.policy import (
    PolicyWithValueHead,
    export_model,
    non_finite_parameters,
    value_head_bytes,
)
from rlhf_online.trainer.ppo import (
    LossTerms,
    compute_rewards,
    gae_advantages,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_loss,
)
from rlhf_online.trainer.rollout import Rollouts, policy_outputs, response_logprobs, sample_rollouts
from rlhf_online.trainer.trunk import capture_trunk, common_trunk
from rlhf_online.trainer.trunk import matches as trunk_matches

log = logging.getLogger(__name__)

_LOGGED_TERMS = ("loss", "pg_loss", "v_loss", "entropy", "clip_frac", "v_clip_frac", "approx_kl")


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
    trunk: torch.Tensor | None = None  # (B, P + T, H) the frozen blocks' output (trainer.trunk), if kept

    def kl_per_response(self) -> float:
        """Mean over rollouts of sum_t KL_t, nats: what the KL controller steers."""
        return masked_sum(self.kl, self.rollouts.response_mask, dim=1).mean().item()


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
        """Gate figures plus round stats: the numbers in the manifest, the ModelEvent and the RoundEvent."""
        return {**self.decision.figures(), **self.stats}


class Timer:
    """Wall times of a round's stages, in seconds, by figure name ("generate_s", ...)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Times the block into `self.s[key]` (only when it finishes without raising)."""
        t0 = time.perf_counter()
        yield
        self.s[key] = time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class RoundSetup:
    """What stays the same through one round's stages."""

    policy: PolicyWithValueHead  # trained in place
    reference: nn.Module  # frozen KL anchor
    tokenizer: PreTrainedTokenizerBase
    reward_fn: RewardFn
    eval_prompts: list[str]  # held out: the gate's prompts, never trained on
    config: TrainerConfig
    name: str  # for the logs
    should_stop: Callable[[], bool]
    timer: Timer = field(default_factory=Timer)

    def check_stop(self, before: str) -> None:
        """Raises RoundAbandoned when the service is stopping."""
        if self.should_stop():
            raise RoundAbandoned(f"{self.name}: stopped before {before}")

    def evaluate(self, lm: nn.Module) -> EvalResult:
        """`lm` on the held-out prompts with the gate's fixed sampling seed (the same for both versions)."""
        c = self.config
        return evaluate_policy(
            lm, self.reference, self.tokenizer, self.reward_fn, self.eval_prompts,
            samples_per_prompt=c.eval_samples_per_prompt, max_new_tokens=c.max_new_tokens,
            temperature=c.temperature, max_prompt_tokens=c.max_prompt_tokens,
            batch_size=c.generation_batch_size, seed=c.eval_seed,
        )  # fmt: skip


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
    serving: nn.Module | None = None,
    serving_answers: EvalResult | None = None,
) -> RoundResult:
    """Runs one round on `policy` (trained in place) and returns the merged candidate and the gate's verdict.

    `serving` is the version the gate compares against, when the round does not start from it (it starts
    from a candidate an earlier round trained and the gate did not publish); by default `policy` itself.
    `serving_answers` is that version's evaluation by an earlier round on the same held-out prompts (with
    the same config): its answers are re-scored by this round's reward model instead of sampled again,
    which saves a third of a round on a real model.

    Raises:
        RoundAbandoned: `should_stop()` turned true; the caller must not publish anything.
        ValueError: no prompts, or the reward model returned non-finite scores.
    """
    if not eval_prompts:
        raise ValueError("no held-out prompts for the eval gate")
    setup = RoundSetup(policy, reference, tokenizer, reward_fn, eval_prompts, config, name, should_stop)
    serving_eval = evaluate_serving(setup, policy.lm if serving is None else serving, serving_answers)  # 1.
    setup.check_stop("rollouts")
    exp = collect_experience(setup, train_prompts, kl_ctl.value, seed)  # 2.
    setup.check_stop("PPO updates")
    ppo_stats = train(setup, exp, seed)  # 3.
    kl_coef_used = kl_ctl.value
    kl_ctl.update(exp.kl_per_response(), len(exp.rollouts))
    setup.check_stop("the eval gate")
    model, head, candidate_eval, decision = gate(setup, serving_eval)  # 4.
    stats = round_stats(
        setup.timer, exp, ppo_stats, (kl_coef_used, kl_ctl.value), serving_eval, candidate_eval
    )
    _log_verdict(name, decision, stats)
    return RoundResult(model, head, decision, serving_eval, candidate_eval, stats)


def evaluate_serving(setup: RoundSetup, serving: nn.Module, earlier: EvalResult | None) -> EvalResult:
    """Step 1: the version serving now, scored on the held-out prompts before any update (its answers from
    `earlier`, when given, re-scored by this round's reward model)."""
    rescore = earlier is not None and bool(earlier.responses)
    with setup.timer.stage("eval_serving_s"):
        serving_eval = earlier.rescored(setup.reward_fn) if rescore else setup.evaluate(serving)
    log.info(
        "%s: serving policy scores %.4f on %d held-out answers (%.1fs%s)",
        setup.name, serving_eval.mean_score, serving_eval.n, setup.timer.s["eval_serving_s"],
        ", its earlier answers re-scored" if rescore else "",
    )  # fmt: skip
    return serving_eval


def collect_experience(setup: RoundSetup, train_prompts: list[str], kl_coef: float, seed: int) -> Experience:
    """Step 2: sample rollouts, score them, then old log-probs, values, rewards and advantages."""
    prompts = pick_prompts(train_prompts, setup.config.rollouts_per_round, random.Random(seed))
    with setup.timer.stage("generate_s"):
        rollouts = sample(setup, prompts, seed)
    _log_rollouts(setup.name, rollouts, setup.timer.s["generate_s"])
    setup.check_stop("scoring")
    with setup.timer.stage("score_s"):
        scores = score(setup, rollouts)
    with setup.timer.stage("experience_s"):
        exp = make_experience(setup.policy, setup.reference, rollouts, scores, setup.config, kl_coef)
    log.info(
        "%s: reward mean %.4f (std %.4f), KL to reference %.3f nats/response, beta %.4f",
        setup.name, scores.mean().item(), scores.std().item(), exp.kl_per_response(), kl_coef,
    )  # fmt: skip
    return exp


def pick_prompts(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n prompts from `pool`: without replacement when it is large enough, with replacement otherwise."""
    if not pool:
        raise ValueError("no training prompts; wait for interactions or pass --prompt-file")
    return rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n)


def sample(setup: RoundSetup, prompts: list[str], seed: int) -> Rollouts:
    """One sampled response per prompt from the policy being trained."""
    c = setup.config
    return sample_rollouts(
        setup.policy.lm, setup.tokenizer, prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
        max_prompt_tokens=c.max_prompt_tokens, batch_size=c.generation_batch_size, seed=seed,
    )  # fmt: skip


def _log_rollouts(name: str, rollouts: Rollouts, generate_s: float) -> None:
    log.info(
        "%s: sampled %d rollouts in %.1fs (%.1f rollouts/s, mean %.1f tokens)",
        name, len(rollouts), generate_s, len(rollouts) / generate_s,
        rollouts.response_mask.sum(dim=1).mean().item(),
    )  # fmt: skip


def score(setup: RoundSetup, rollouts: Rollouts) -> torch.Tensor:
    """(B,) reward-model scores on the rollouts' device.

    Raises:
        ValueError: the reward model returned the wrong number of scores or non-finite ones.
    """
    device = rollouts.response_ids.device
    scores = setup.reward_fn(rollouts.prompts, rollouts.responses).detach().float().reshape(-1).to(device)
    if scores.shape[0] != len(rollouts) or not torch.isfinite(scores).all():
        raise ValueError(
            f"{setup.name}: the reward model returned {scores.shape[0]} scores with non-finite values "
            f"for {len(rollouts)} responses; check the reward checkpoint"
        )
    return scores  # (B,)


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
    split = policy.trunk_split
    with capture_trunk(policy.lm, split) if split else contextlib.nullcontext([]) as trunk:
        for start in range(0, len(rollouts), config.minibatch_size):
            chunk = rollouts.select(torch.arange(start, min(start + config.minibatch_size, len(rollouts))))
            lp, v, _ = policy_outputs(policy, chunk, config.temperature)
            logprobs.append(lp * chunk.response_mask)
            values.append(v * chunk.response_mask)
    logprobs_t, values_t = torch.cat(logprobs), torch.cat(values)  # (B, T)
    kept = torch.cat(trunk) if trunk else None  # (B, P + T, H)
    if kept is not None and not trunk_reproduces(policy, rollouts, kept, logprobs_t, config):
        log.warning(
            "%s's forward does not take the kept trunk as the first trainable block's input; PPO steps "
            "run the whole model", type(policy.lm).__name__,
        )  # fmt: skip
        kept = None
    shared = kept is not None and common_trunk(policy.lm, reference) >= split
    ref_logprobs = response_logprobs(
        reference, rollouts, config.temperature, config.minibatch_size, kept if shared else None, split
    )  # (B, T)
    mask = rollouts.response_mask
    rewards, kl = compute_rewards(scores, logprobs_t, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae_advantages(rewards, values_t, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        rollouts, scores, logprobs_t, ref_logprobs, values_t, rewards, kl, advantages, returns, trunk=kept
    )


def train(setup: RoundSetup, exp: Experience, seed: int) -> dict[str, float]:
    """Step 3: clipped PPO epochs with a fresh AdamW over the trainable parameters; the mean figures."""
    c = setup.config
    with setup.timer.stage("train_s"):
        trainable = [p for p in setup.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=c.learning_rate, eps=1e-5, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        return ppo_update(setup.policy, optimizer, exp, c, generator, setup.should_stop, setup.name)


@torch.no_grad()
def trunk_reproduces(
    policy: PolicyWithValueHead,
    rollouts: Rollouts,
    trunk: torch.Tensor,
    logprobs: torch.Tensor,
    config: TrainerConfig,
) -> bool:
    """Do the top blocks on the kept trunk (B, P + T, H) give the whole forward's `logprobs` (B, T)?
    Checked on the first minibatch, before any update."""
    idx = torch.arange(min(config.minibatch_size, len(rollouts)))
    mb = rollouts.select(idx)
    again, _, _ = policy_outputs(policy, mb, config.temperature, trunk[idx])  # (b, T)
    return trunk_matches(again * mb.response_mask, logprobs[idx], mb.response_mask)


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
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(len(exp.rollouts), generator=generator)  # (B,)
        for idx in order.split(config.minibatch_size):
            if should_stop():
                raise RoundAbandoned(f"{name}: stopped during PPO epoch {epoch + 1}")
            terms, grad_norm = ppo_step(policy, optimizer, params, exp, idx, config)
            for key in _LOGGED_TERMS:
                logged[key].append(getattr(terms, key).item())
            logged["grad_norm"].append(grad_norm)
        _log_epoch(name, epoch, config, logged, minibatches=len(order.split(config.minibatch_size)))
    policy.eval()
    return {key: sum(v) / len(v) for key, v in logged.items()}


def ppo_step(
    policy: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    exp: Experience,
    idx: torch.Tensor,
    config: TrainerConfig,
) -> tuple[LossTerms, float]:
    """One clipped PPO gradient step on the rollouts `idx` (b,) of `exp`; the loss terms and grad norm."""
    mb = exp.rollouts.select(idx)
    trunk = None if exp.trunk is None else exp.trunk[idx]  # (b, P + T, H)
    logprobs, values, entropy = policy_outputs(policy, mb, config.temperature, trunk)  # (b, T) each
    terms = ppo_loss(
        logprobs, values, entropy,
        old_logprobs=exp.logprobs[idx], old_values=exp.values[idx], advantages=exp.advantages[idx],
        returns=exp.returns[idx], mask=mb.response_mask, clip_range=config.clip_range,
        clip_range_value=config.clip_range_value, vf_coef=config.vf_coef, ent_coef=config.ent_coef,
    )  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    return terms, grad_norm.item()


def _log_epoch(
    name: str, epoch: int, config: TrainerConfig, logged: dict[str, list[float]], minibatches: int
) -> None:
    """One line per epoch: the means over its `minibatches` steps."""

    def last(key: str) -> float:
        tail = logged[key][-minibatches:]
        return sum(tail) / len(tail)

    log.info(
        "%s: PPO epoch %d/%d pg_loss %.4f v_loss %.4f clip_frac %.3f approx_kl %.4f",
        name, epoch + 1, config.ppo_epochs, last("pg_loss"), last("v_loss"), last("clip_frac"),
        last("approx_kl"),
    )  # fmt: skip


def gate(
    setup: RoundSetup, serving_eval: EvalResult
) -> tuple[PreTrainedModel, bytes, EvalResult | None, GateDecision]:
    """Step 4: merge the candidate, check its weights, evaluate it like the serving one, and decide."""
    c = setup.config
    with setup.timer.stage("eval_candidate_s"):
        head = value_head_bytes(setup.policy)
        model = export_model(setup.policy)
        bad = non_finite_parameters(model)
        candidate_eval = None if bad else setup.evaluate(model)
    decision = decide(
        candidate_eval, serving_eval, non_finite=bad, margin=c.gate_margin, max_kl=c.gate_max_kl
    )
    return model, head, candidate_eval, decision


def round_stats(
    timer: Timer,
    exp: Experience,
    ppo_stats: dict[str, float],
    kl_coefs: tuple[float, float],
    serving_eval: EvalResult,
    candidate_eval: EvalResult | None,
) -> dict[str, float]:
    """The round's figures: reward, KL, PPO means (`ppo_*`), stage timings (`*_s`) and time shares."""
    timings = {**timer.s, RoundFigure.ROUND_S: timer.total()}
    timings["eval_generate_s"] = serving_eval.generate_s + (
        candidate_eval.generate_s if candidate_eval else 0.0
    )
    sampling_s = timings["generate_s"] + timings["eval_generate_s"]
    training_s = timings["experience_s"] + timings["train_s"]
    scores, mask, n = exp.scores, exp.rollouts.response_mask, len(exp.rollouts)
    return {
        RoundFigure.REWARD_MEAN: scores.mean().item(),
        RoundFigure.REWARD_STD: scores.std().item() if len(scores) > 1 else 0.0,
        RoundFigure.KL_PER_RESPONSE: exp.kl_per_response(),
        RoundFigure.KL_COEF: kl_coefs[0],
        RoundFigure.KL_COEF_NEXT: kl_coefs[1],
        "response_tokens_mean": mask.sum(dim=1).mean().item(),
        "advantage_mean_raw": masked_mean(exp.returns - exp.values, mask).item(),
        "rollouts": float(n),
        "rollouts_per_s": n / timings["generate_s"],
        "share_generating": sampling_s / timings[RoundFigure.ROUND_S],
        "share_training": training_s / timings[RoundFigure.ROUND_S],
        **{f"ppo_{k}": v for k, v in ppo_stats.items()},
        **timings,
    }


def _log_verdict(name: str, decision: GateDecision, stats: dict[str, float]) -> None:
    log.info(
        "%s: gate %s: %s (round %.1fs: %.0f%% sampling, %.0f%% training, the rest scoring and eval)",
        name, "PASSED" if decision.passed else "REJECTED", decision.reason, stats[RoundFigure.ROUND_S],
        100 * stats["share_generating"], 100 * stats["share_training"],
    )  # fmt: skip
