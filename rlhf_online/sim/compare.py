"""What the loop changed in the policy's words: the first and the last version side by side on held-out
prompts, and how fluent each version's served answers read to the base model.

    comparison = compare_run(run_dir, base_model_dir, first="v000001", last="v000005")
    (run_dir / "compare.json").write_text(comparison.to_json())
    report.write_report(data, run_dir, comparison=comparison)

A rising thumbs-up rate says the users liked the last version better, not what it now writes. So:

1. `heldout_prompts`: user messages the trainer never trained on (it holds a prompt out by the hash of its
   rendered text, `trainer.triggers.split_prompts`), so an answer that changed was not memorised;
2. `side_by_side`: the greedy answer of each version to those prompts, rendered, tokenized and stopped the
   way serving does (chat template, end of the assistant's turn);
3. `fluency`: the base model's mean log-prob per token of the answers each version served, and the version's
   KL to the base on them. A policy that learned the judge's taste but kept its language stays near the
   base's figure; one wrecked by reward hacking writes text the base finds far less likely.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_online.contract import POLICY
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.engine import _stop_ids, load_policy  # serving's own stop ids, not a copy of them
from rlhf_online.engine.sampling import pad_id
from rlhf_online.registry import Registry
from rlhf_online.sim.simulate import load_prompts
from rlhf_online.trainer.policy import load_reference
from rlhf_online.trainer.ppo import kl_estimate, masked_mean, masked_sum
from rlhf_online.trainer.rollout import Rollouts, encode_prompts, response_logprobs
from rlhf_online.trainer.service import render
from rlhf_online.trainer.triggers import prompt_hash

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.2  # the trainer's default `heldout_fraction`
MAX_PROMPT_TOKENS = 512  # a longer prompt keeps its end, as in the trainer's rollouts
BATCH_SIZE = 8  # prompts per generate call, answers per forward pass


@dataclass(frozen=True)
class Pair:
    """One held-out prompt and the greedy answer of each version."""

    prompt: str  # the user's message
    first: str  # the first version's answer
    last: str  # the last version's answer
    first_finish: str  # "stop" (the end of the turn) | "length" (cut at max_new_tokens)
    last_finish: str


@dataclass(frozen=True)
class Fluency:
    """How one version's served answers read to the reference (base) model."""

    version: str
    answers: int  # answers scored
    tokens_per_answer: float  # mean answer tokens, the end of the turn included
    ref_logprob_per_token: float  # mean over every answer token of log p_ref(a_t | s_t), nats
    kl_to_reference: float  # mean over answers of sum_t k1(version || reference), nats


@dataclass
class Comparison:
    """Everything `compare_run` found; `to_json` is the run folder's compare.json."""

    first: str
    last: str
    pairs: list[Pair]
    fluency: dict[str, Fluency]  # by version, oldest first

    def fluency_json(self) -> dict[str, dict]:
        """The fluency figures as summary.json holds them."""
        return {version: asdict(f) for version, f in self.fluency.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# ---- held-out prompts --------------------------------------------------------------------------------------


def heldout_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n: int = 8,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> list[str]:
    """Up to `n` distinct user messages that the trainer never trains on, smallest hash first.

    The hash is of the prompt as the server renders it into the Interaction (the chat template) and the
    trainer pools it, so this is the trainer's own split (`split_prompts`), without its fallback for a pool
    where no prompt hashes below `heldout_fraction`.
    """
    hashes = {p: prompt_hash(render(tokenizer, (("user", p),))) for p in prompts}
    held = sorted((h, p) for p, h in hashes.items() if h < heldout_fraction)
    return [p for _, p in held[:n]]


# ---- side by side ------------------------------------------------------------------------------------------


def load_version(
    registry_dir: str | Path, version: str, device: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A policy version from verified files, loaded as serving loads it, and its tokenizer."""
    path = Registry(registry_dir).verify(POLICY, version)
    return load_policy(path, device), AutoTokenizer.from_pretrained(path)


def _until_stop(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: set[int]) -> tuple[str, str]:
    """The text before the first stop token, decoded as serving does, and why the answer ended."""
    end = next((i for i, token in enumerate(ids) if token in stop), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.removesuffix("\ufffd"), "length" if end is None else "stop"


@torch.no_grad()
def greedy_answers(
    lm: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_new_tokens: int
) -> list[tuple[str, str]]:
    """(answer, finish reason) of every user message, argmax token by token.

    `rollout.sample_rollouts` samples (it cannot do temperature 0) and stops at the tokenizer's eos only, so
    this calls `generate` itself, with serving's stop ids: the model's and tokenizer's eos ids and the
    template's end of turn (`<|im_end|>` for SmolLM2).
    """
    stop = _stop_ids(lm, tokenizer)
    device = next(lm.parameters()).device
    answers = []
    for start in range(0, len(prompts), BATCH_SIZE):
        rendered = [render_prompt(tokenizer, [("user", p)]) for p in prompts[start : start + BATCH_SIZE]]
        ids, mask = encode_prompts(tokenizer, rendered, MAX_PROMPT_TOKENS)  # (B, P), (B, P)
        out = lm.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id(tokenizer),
            eos_token_id=sorted(stop),
        )  # (B, P + T)
        answers += [_until_stop(tokenizer, row.tolist(), stop) for row in out[:, ids.shape[1] :]]
    return answers


def side_by_side(
    registry_dir: str | Path,
    first: str,
    last: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    device: str = "cpu",
) -> list[Pair]:
    """The greedy answers of versions `first` and `last` to the same user messages, one Pair per prompt.

    Greedy, so a pair differs only because the weights do (sampled answers differ from one draw to the next).
    """
    answers = []
    for version in (first, last):
        lm, tokenizer = load_version(registry_dir, version, device)
        answers.append(greedy_answers(lm, tokenizer, prompts, max_new_tokens=max_new_tokens))
        del lm
    return [
        Pair(prompt, a, b, a_finish, b_finish)
        for prompt, (a, a_finish), (b, b_finish) in zip(prompts, *answers, strict=True)
    ]


# ---- fluency -----------------------------------------------------------------------------------------------


def _stopped(outcome: dict) -> bool:
    return outcome.get("finish_reason") == "stop"


def served_answers(outcomes_path: str | Path, version: str, max_answers: int) -> list[dict]:
    """Up to `max_answers` outcomes (simulate.Outcome fields) that `version` answered, spread evenly over the
    requests in their order, so the pick is the same every time and covers the whole time it served."""
    lines = Path(outcomes_path).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    # an answer holds at least one token: some text, or the end of the turn
    mine = [r for r in rows if r.get("model_version") == version and (r.get("text") or _stopped(r))]
    k = min(max_answers, len(mine))
    return [mine[i * len(mine) // k] for i in range(k)]


def answer_rollouts(
    tokenizer: PreTrainedTokenizerBase, outcomes: Sequence[dict], device: str = "cpu"
) -> Rollouts:
    """The answers as a batch to score: prompts rendered as serving does, answers re-tokenized from their
    text (plus the end of the turn where they stopped: that token was sampled too)."""
    prompts = [render_prompt(tokenizer, [("user", o["prompt"])]) for o in outcomes]
    query_ids, query_mask = encode_prompts(tokenizer, prompts, MAX_PROMPT_TOKENS)  # (B, P), (B, P)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = [
        tokenizer.encode(o["text"], add_special_tokens=False) + (end if _stopped(o) else []) for o in outcomes
    ]
    width = max([1, *map(len, rows)])
    response_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)  # (B, T)
    response_mask = torch.zeros((len(rows), width))  # (B, T)
    for i, row in enumerate(rows):
        response_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, : len(row)] = 1.0
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (B, P + T)
    position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)  # (B, P + T)
    tensors = (query_ids, response_ids, attention_mask, position_ids, response_mask)
    return Rollouts(prompts, [o["text"] for o in outcomes], *(t.to(device) for t in tensors))


def _figures(version: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> Fluency:
    """Fluency of one version from its and the reference's log-probs of its answers, each (B, T)."""
    kl = masked_sum(kl_estimate(logprobs, ref_logprobs, "k1"), mask, dim=1)  # (B,)
    return Fluency(
        version=version,
        answers=len(mask),
        tokens_per_answer=mask.sum(dim=1).mean().item(),
        ref_logprob_per_token=masked_mean(ref_logprobs, mask).item(),
        kl_to_reference=kl.mean().item(),
    )


def fluency(
    registry_dir: str | Path,
    outcomes_path: str | Path,
    versions: Sequence[str],
    base_model_dir: str | Path,
    *,
    max_answers: int = 48,
    device: str = "cpu",
) -> dict[str, Fluency]:
    """Per version with answers in the outcomes: the reference's log-prob per token of up to `max_answers`
    of them, and the version's KL to the reference, mean over answers of sum_t (log p_v - log p_ref) (k1,
    Schulman's "Approximating KL Divergence"), both at temperature 1.

    k1 is unbiased for answers sampled from the version at temperature 1 and top-p 1, which is what serving
    does when a request leaves them unset (`InferenceConfig.default_temperature` = 1.0, as the demo's users
    do). Answers sampled at another temperature, or re-tokenized differently from how they were sampled, make
    it a rougher figure. The models load in float32, as the trainer's reference does.
    """
    registry = Registry(registry_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    reference = load_reference(base_model_dir, device)
    figures = {}
    for version in versions:
        outcomes = served_answers(outcomes_path, version, max_answers)
        if not outcomes:
            continue
        rollouts = answer_rollouts(tokenizer, outcomes, device)
        ref_logprobs = response_logprobs(reference, rollouts, 1.0, BATCH_SIZE)  # (B, T)
        lm = load_reference(registry.verify(POLICY, version), device)
        logprobs = response_logprobs(lm, rollouts, 1.0, BATCH_SIZE)  # (B, T)
        del lm
        figures[version] = _figures(version, logprobs.cpu(), ref_logprobs.cpu(), rollouts.response_mask.cpu())
    return figures


# ---- the whole comparison ----------------------------------------------------------------------------------


def served_versions(outcomes_path: str | Path, registry: Registry) -> list[str]:
    """The registry's policy versions (oldest first) that answered at least one request in the outcomes."""
    lines = Path(outcomes_path).read_text(encoding="utf-8").splitlines()
    seen = {json.loads(line).get("model_version") for line in lines if line.strip()}
    return [v for v in registry.versions(POLICY) if v in seen]


def compare_run(
    run_dir: str | Path,
    base_model_dir: str | Path,
    *,
    first: str,
    last: str,
    n_prompts: int = 8,
    max_new_tokens: int = 48,
    max_answers: int = 48,
    versions: Sequence[str] | None = None,
    device: str = "cpu",
) -> Comparison:
    """The comparison of a demo's run folder (`registry/`, `outcomes.jsonl`): `first` and `last` side by side
    on `n_prompts` held-out prompts of the simulator's built-in list, and the fluency of `versions` (None:
    every version in the registry that served an answer).

    Raises:
        VersionNotFound, CorruptVersion: `first` or `last` is not a complete version in the registry.
    """
    run_dir = Path(run_dir)
    registry = Registry(run_dir / "registry")
    for version in (first, last):
        registry.manifest(POLICY, version)  # an unknown version fails here, naming those there are
    tokenizer = AutoTokenizer.from_pretrained(registry.path(POLICY, first))  # verified by side_by_side
    prompts = heldout_prompts(tokenizer, load_prompts(), n_prompts)
    pairs = side_by_side(registry.root, first, last, prompts, max_new_tokens=max_new_tokens, device=device)
    outcomes = run_dir / "outcomes.jsonl"
    if versions is None:
        versions = served_versions(outcomes, registry) if outcomes.is_file() else []
    figures = fluency(
        registry.root, outcomes, versions, base_model_dir, max_answers=max_answers, device=device
    )
    log.info(
        "compared %s with %s on %d held-out prompts; fluency of %d versions",
        first,
        last,
        len(pairs),
        len(figures),
    )
    return Comparison(first, last, pairs, figures)
