"""Rollouts: sample responses from the current policy, then score their tokens with forward passes.

Layout of one batch (B rollouts): prompt tokens left-padded to P, response tokens right-padded to T after the
first end-of-sequence token, so `input_ids = cat(query_ids, response_ids)` is (B, P + T) and the logits that
predict the response are those at positions P-1 .. P+T-2. Log-probabilities are recomputed with a forward pass
(as TRL's PPOTrainer does) rather than taken from sampling, so the old and new log-probs of the PPO ratio come
from the same computation; logits are divided by the sampling temperature in both.
"""

import contextlib
import logging
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_online.engine.sampling import pad_id
from rlhf_online.trainer.ppo import entropy_from_logits, logprobs_from_logits
from rlhf_online.trainer.trunk import capture_trunk, common_trunk, matches, top_blocks_only

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """Sampled responses of one batch of prompts."""

    prompts: list[str]  # B rendered prompts
    responses: list[str]  # B decoded responses (special tokens dropped)
    query_ids: torch.Tensor  # (B, P) prompt tokens, left-padded
    response_ids: torch.Tensor  # (B, T) response tokens, right-padded after the first EOS
    attention_mask: torch.Tensor  # (B, P + T) 1 on real prompt and response tokens
    position_ids: torch.Tensor  # (B, P + T) as `generate` computed them: cumsum(mask) - 1
    response_mask: torch.Tensor  # (B, T) float, 1.0 on response tokens (the EOS included)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, P + T)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> "Rollouts":
        """The rollouts at `index` (a 1-D tensor of row numbers), for minibatches."""
        rows = index.tolist()
        return Rollouts(
            prompts=[self.prompts[i] for i in rows],
            responses=[self.responses[i] for i in rows],
            **{
                f.name: getattr(self, f.name)[index]
                for f in fields(self)
                if f.name not in ("prompts", "responses")
            },
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, keeping the last `max_prompt_tokens` tokens of each prompt.

    Tokenized the way the serving engine does (`PolicyEngine.encode_chat`): a chat template writes its own
    special tokens, a plain transcript gets the tokenizer's usual ones.
    """
    with_specials = not getattr(tokenizer, "chat_template", None)
    rows = [tokenizer.encode(p, add_special_tokens=with_specials)[-max_prompt_tokens:] for p in prompts]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [row or [start] for row in rows]  # an empty prompt still needs one token to condition on
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask  # (B, P), (B, P)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1.0 up to and including the first EOS of each row, 0.0 after; (B, T) -> (B, T)."""
    is_eos = (response_ids == eos_token_id).long()  # (B, T)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).float()


@torch.no_grad()
def sample_responses(
    lm: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    max_prompt_tokens: int,
    seed: int,
) -> Rollouts:
    """Samples one response per prompt (one `generate` call, seeded) and returns them as a batch."""
    device = next(lm.parameters()).device
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    was_training = lm.training
    lm.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = lm.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, P + T)
    lm.train(was_training)
    response_ids = out[:, query_ids.shape[1] :]  # (B, T)
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)  # (B, T)
    response_ids = torch.where(response_mask > 0, response_ids, pad_id(tokenizer))
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (B, P + T)
    position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)  # (B, P + T)
    responses = [
        tokenizer.decode(row[mask > 0], skip_special_tokens=True)
        for row, mask in zip(response_ids, response_mask, strict=True)
    ]
    return Rollouts(prompts, responses, query_ids, response_ids, attention_mask, position_ids, response_mask)


def sample_rollouts(
    lm: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    max_prompt_tokens: int,
    batch_size: int,
    seed: int,
) -> Rollouts:
    """`sample_responses` over chunks of `batch_size` prompts, concatenated into one padded batch."""
    chunks = [
        sample_responses(
            lm,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            max_prompt_tokens=max_prompt_tokens,
            seed=seed + start,
        )
        for start in range(0, len(prompts), batch_size)
    ]
    return concat_rollouts(chunks, pad_token_id=pad_id(tokenizer))


def concat_rollouts(chunks: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Joins batches with different P and T: prompts padded on the left, responses on the right."""
    if len(chunks) == 1:
        return chunks[0]
    P = max(c.query_ids.shape[1] for c in chunks)
    T = max(c.response_ids.shape[1] for c in chunks)

    def pad(x: torch.Tensor, left: int, right: int, value: float) -> torch.Tensor:
        return nn.functional.pad(x, (left, right), value=value)

    parts = []
    for c in chunks:
        dp, dt = P - c.query_ids.shape[1], T - c.response_ids.shape[1]
        parts.append(
            (
                pad(c.query_ids, dp, 0, pad_token_id),
                pad(c.response_ids, 0, dt, pad_token_id),
                pad(c.attention_mask, dp, dt, 0),
                pad(c.position_ids, dp, dt, 0),
                pad(c.response_mask, 0, dt, 0.0),
            )
        )
    query_ids, response_ids, attention_mask, position_ids, response_mask = (
        torch.cat(t) for t in zip(*parts, strict=True)
    )
    prompts = [p for c in chunks for p in c.prompts]
    responses = [r for c in chunks for r in c.responses]
    return Rollouts(prompts, responses, query_ids, response_ids, attention_mask, position_ids, response_mask)


def response_logits(
    lm: nn.Module, rollouts: Rollouts, temperature: float, trunk: torch.Tensor | None = None, split: int = 0
) -> torch.Tensor:
    """Logits (divided by the temperature) that predict each response token; (B, T, V). With `trunk`
    (B, P + T, H), the output of `lm`'s bottom `split` blocks for these rollouts: only the rest run."""
    T = rollouts.response_ids.shape[1]
    inputs = {"input_ids": rollouts.input_ids} if trunk is None else {"inputs_embeds": trunk}
    with contextlib.nullcontext() if trunk is None else top_blocks_only(lm, split):
        out = lm(
            **inputs,
            attention_mask=rollouts.attention_mask,
            position_ids=rollouts.position_ids,
            logits_to_keep=T + 1,
            use_cache=False,
        )
    return out.logits[:, :-1].float() / temperature  # (B, T, V)


@torch.no_grad()
def response_logprobs(
    lm: nn.Module,
    rollouts: Rollouts,
    temperature: float,
    batch_size: int,
    trunk: torch.Tensor | None = None,
    split: int = 0,
) -> torch.Tensor:
    """log pi(a_t | s_t) of every response token under `lm`, in chunks of `batch_size`; (B, T)."""
    out = []
    for start in range(0, len(rollouts), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(rollouts)))
        chunk = rollouts.select(rows)
        logits = response_logits(lm, chunk, temperature, None if trunk is None else trunk[rows], split)
        out.append(logprobs_from_logits(logits, chunk.response_ids) * chunk.response_mask)  # (b, T)
    return torch.cat(out)  # (B, T)


@torch.no_grad()
def logprobs_with_reference(
    lm: nn.Module, reference: nn.Module, rollouts: Rollouts, temperature: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` under `lm` and under `reference`, each (B, T); the bottom blocks they share
    weight for weight (`trunk.common_trunk`) run once, if the model takes their output back."""
    split = common_trunk(lm, reference)
    if split == 0:
        return tuple(response_logprobs(m, rollouts, temperature, batch_size) for m in (lm, reference))
    with capture_trunk(lm, split) as kept:
        logprobs = response_logprobs(lm, rollouts, temperature, batch_size)  # (B, T)
    trunk = torch.cat(kept)  # (B, P + T, H)
    rows = torch.arange(min(batch_size, len(rollouts)))
    again = response_logprobs(lm, rollouts.select(rows), temperature, batch_size, trunk[rows], split)
    if not matches(again, logprobs[rows], rollouts.response_mask[rows]):
        return logprobs, response_logprobs(reference, rollouts, temperature, batch_size)
    return logprobs, response_logprobs(reference, rollouts, temperature, batch_size, trunk, split)


def policy_outputs(
    policy: nn.Module, rollouts: Rollouts, temperature: float, trunk: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, values and entropies of the response tokens under a `PolicyWithValueHead`; each (B, T).

    Values are read at the state before each token (positions P-1 .. P+T-2), where the action is chosen.
    `trunk` (B, P + T, H) is the frozen blocks' output for these rollouts (see `trainer.trunk`).
    """
    T = rollouts.response_ids.shape[1]
    ids, mask, pos = rollouts.input_ids, rollouts.attention_mask, rollouts.position_ids
    logits, values = policy(ids, mask, pos, T + 1, trunk=trunk)
    logits = logits[:, :-1].float() / temperature  # (B, T, V)
    values = values[:, :-1]  # (B, T)
    logprobs = logprobs_from_logits(logits, rollouts.response_ids)  # (B, T)
    return logprobs, values, entropy_from_logits(logits)
