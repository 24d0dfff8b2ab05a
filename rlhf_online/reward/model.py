"""The reward model: a transformer backbone with a scalar head (AutoModelForSequenceClassification, 1 label).

It scores the text `prompt + response` (the rendered prompt exactly as the policy saw it, then the answer);
the score is a logit of P(thumbs up | prompt, response). The trainer loads it with:

    reward_model = load_reward_model(registry.verify("reward", registry.latest("reward")))
    rewards = reward_model.score(prompts, responses)  # (B,)

Most of the backbone stays frozen (classic RLHF practice, and it keeps online updates cheap on CPU): only the
top `trainable_layers` transformer blocks, the final norm and the head learn.
"""

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlhf_online.reward.config import POOLINGS

log = logging.getLogger(__name__)

REWARD_CONFIG = "reward_config.json"
# "last": the head reads the last token (AutoModelForSequenceClassification's own pooling).
# "response_mean": the head scores every response token and the scores are averaged over the response. A
# preference that is a property of the whole answer (its characters, words, tone) is then a mean of
# per-token terms, which a scalar head learns from a few hundred ratings; reading it off one token needs the
# upper layers to learn to aggregate first, which took thousands of ratings with the tiny model.
# "response_features": the answer's hidden states pooled five ways (mean: shares of a kind of token; max:
# presence or absence of one; first and last token: how it starts and ends; its length) and scored by one
# linear layer. Mean pooling alone cannot see where a token stands or how long the answer is, so it fails
# every preference about starts, ends and length (benchmarks/reward_suite.py).
FEATURE_HEAD_FILE = "feature_head.safetensors"


LENGTH_FREQUENCIES = 32  # sinusoids that encode the answer's length in tokens


def length_encoding(count: torch.Tensor, max_length: int) -> torch.Tensor:
    """Sinusoids (B, 2F) of token counts (B,), periods from 2 tokens to 4 * max_length (as positional
    encodings do for positions, Vaswani et al. 2017): a linear layer on them can prefer any band of lengths,
    and a change of one token moves many of them, so it is learnt as fast as the other features."""
    periods = torch.logspace(
        math.log10(2.0), math.log10(4.0 * max_length), LENGTH_FREQUENCIES, device=count.device
    )  # (F,)
    angles = 2 * math.pi * count.to(torch.float32).unsqueeze(-1) / periods  # (B, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2F)


class ResponseFeatures(nn.Module):
    """The "response_features" head: [mean, max, first, last, length] of the answer -> a score."""

    def __init__(self, hidden_size: int, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.linear = nn.Linear(4 * hidden_size + 2 * LENGTH_FREQUENCIES, 1)
        nn.init.zeros_(self.linear.weight)  # every answer starts at the same score: no preference yet
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from hidden states (B, T, H) and the answer's mask (B, T)."""
        mask = response_mask.bool()  # (B, T)
        count = mask.sum(dim=1)  # (B,)
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * weights).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)  # (B, H)
        peak = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, H)
        peak = torch.where(count.unsqueeze(-1) > 0, peak, torch.zeros_like(peak))  # an empty answer: 0
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        first_at = mask.to(torch.int8).argmax(dim=1)  # (B,) first answer token (0 for an empty answer)
        last_at = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)  # (B,)
        length = length_encoding(count, self.max_length).to(hidden.dtype)  # (B, 2F)
        features = [mean, peak, hidden[rows, first_at], hidden[rows, last_at], length]
        return self.linear(torch.cat(features, dim=-1)).squeeze(-1)  # (B,)


class RewardModel(nn.Module):
    """Sequence classifier with one logit, plus the tokenization that goes with it."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        max_length: int = 256,
        prior_logit: float = 0.0,
        pooling: str = "response_mean",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.feature_head: ResponseFeatures | None = None
        self.configure(max_length, pooling)
        # Trained with class-balanced weights, the head predicts the logit under equal priors; adding
        # log(n_up / n_down) restores P(up) under the observed ratio (prior correction, King & Zeng 2001).
        self.prior_logit = prior_logit
        if backbone.config.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is None:
                raise ValueError(
                    "the tokenizer has neither a pad nor an eos token; set pad_token in the base model"
                )
            backbone.config.pad_token_id = pad

    def configure(self, max_length: int, pooling: str) -> None:
        """Sets the token cap and the pooling; a "response_features" head starts at zero (no preference)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling is {pooling!r}; use one of {', '.join(POOLINGS)}")
        self.max_length, self.pooling = max_length, pooling
        hidden = self.backbone.config.hidden_size
        self.feature_head = ResponseFeatures(hidden, max_length) if pooling == "response_features" else None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of `prompt + response`, truncated from the left to `max_length` (the answer matters
        most), with bos/eos where the tokenizer has them, right-padded.

        Returns: input_ids (B, T), attention_mask (B, T) and response_mask (B, T), 1 on the answer's tokens.
        """
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        room = self.max_length - len(bos) - len(eos)
        prompt_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        response_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
        rows, answer_lengths = [], []
        for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
            body = (p_ids + r_ids)[max(0, len(p_ids) + len(r_ids) - room) :]
            rows.append(bos + body + eos)
            answer_lengths.append(min(len(r_ids), len(body)))
        width = max(len(r) for r in rows)
        pad = self.backbone.config.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, (row, n_answer) in enumerate(zip(rows, answer_lengths, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
            end = len(row) - len(eos)
            response_mask[i, end - n_answer : end] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "response_mask": response_mask.to(self.device),
        }

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Scores (B,) of token ids (B, T), pooled as `self.pooling` says."""
        if self.pooling == "last":
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]  # (B,)
        hidden = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
        if self.feature_head is not None:
            return self.feature_head(hidden, response_mask)  # (B,)
        per_token = self.backbone.score(hidden).squeeze(-1)  # (B, T)
        # An empty answer has no tokens to average: it is scored by its last token (the eos, or the prompt's).
        last = attention_mask.sum(dim=1) - 1  # (B,)
        fallback = per_token.gather(1, last.unsqueeze(1)).squeeze(1)  # (B,)
        mask = response_mask.to(per_token.dtype)  # (B, T)
        count = mask.sum(dim=1)  # (B,)
        mean = (per_token * mask).sum(dim=1) / count.clamp(min=1.0)  # (B,)
        return torch.where(count > 0, mean, fallback)  # (B,)

    def logits(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Head outputs (B,) with gradients, for training (without the prior correction)."""
        return self(**self.encode(prompts, responses))

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards (B,) of responses to prompts: the logit of P(thumbs up). No gradients; float32 on CPU."""
        return self.raw_score(prompts, responses, batch_size) + self.prior_logit

    @torch.no_grad()
    def raw_score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Head outputs (B,) without the prior correction."""
        was_training = self.training
        self.eval()
        try:
            out = [
                self.logits(prompts[i : i + batch_size], responses[i : i + batch_size]).float().cpu()
                for i in range(0, len(prompts), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def save(self, path: str | Path) -> None:
        """Writes a folder that `load_reward_model` reads (and that Hugging Face can load on its own)."""
        path = Path(path)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        settings = {"max_length": self.max_length, "prior_logit": self.prior_logit, "pooling": self.pooling}
        (path / REWARD_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        if self.feature_head is not None:
            save_file(self.feature_head.state_dict(), path / FEATURE_HEAD_FILE)


def load_reward_model(path: str | Path, device: str = "cpu") -> RewardModel:
    """Loads a reward model folder (a verified registry version, or a base model to start from).

    A base causal LM gets a freshly initialised scalar head (seed torch before calling for a fixed init).
    """
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    settings = json.loads((path / REWARD_CONFIG).read_text()) if (path / REWARD_CONFIG).exists() else {}
    model = RewardModel(
        backbone,
        tokenizer,
        max_length=int(settings.get("max_length", 256)),
        prior_logit=float(settings.get("prior_logit", 0.0)),
        pooling=str(settings.get("pooling", "last" if settings else "response_mean")),
    )
    if model.feature_head is not None and (path / FEATURE_HEAD_FILE).exists():
        model.feature_head.load_state_dict(load_file(path / FEATURE_HEAD_FILE))
    return model.to(device)


def init_reward_model(
    base_dir: str | Path,
    *,
    max_length: int,
    seed: int,
    device: str = "cpu",
    pooling: str = "response_mean",
    layers: int = -1,
) -> RewardModel:
    """A new reward model: the backbone of `base_dir` (its bottom `layers` blocks; -1: all) with a scalar
    head initialised from `seed`."""
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here, not a warning
    try:
        model = load_reward_model(base_dir, device=device)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.configure(max_length, pooling)
    if layers >= 0:
        keep_bottom_layers(model, layers)
    log.info("new reward model: %s with a new scalar head (%.2fM parameters)", base_dir, _millions(model))
    return model.to(device)


def keep_bottom_layers(model: RewardModel, layers: int) -> None:
    """Drops every transformer block above the bottom `layers` (0 leaves the embeddings, the final norm and
    the head). A shallower reward model learns a simple preference from fewer ratings and costs less CPU:
    from the demo's stream of tiny-model answers, held-out AUC after 400 ratings was 0.74 with 0 blocks
    and 0.58 with all 4. The checkpoint's config.json records the new depth, so it loads as saved."""
    inner = model.backbone.base_model
    blocks = _blocks(inner)
    if layers > len(blocks):
        raise ValueError(f"the base model has {len(blocks)} transformer blocks; cannot keep {layers}")
    del blocks[layers:]
    config = model.backbone.config
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # newer configs list one type per block
        config.layer_types = config.layer_types[:layers]


def freeze_lower_layers(model: RewardModel, trainable_layers: int) -> int:
    """Freezes the backbone except its top `trainable_layers` blocks, their final norm and the head
    (-1 trains everything). Returns the number of trainable parameters."""
    backbone = model.backbone
    for p in backbone.parameters():
        p.requires_grad_(trainable_layers < 0)
    if trainable_layers >= 0:
        inner = backbone.base_model
        prefix = backbone.base_model_prefix + "."
        blocks = _blocks(inner)
        for block in blocks[len(blocks) - trainable_layers :] if trainable_layers else []:
            block.requires_grad_(True)
        for name, p in backbone.named_parameters():
            if not name.startswith(prefix):  # the head
                p.requires_grad_(True)
        if trainable_layers > 0:
            for name, module in inner.named_children():
                if "norm" in name or name in ("ln_f", "final_layer_norm"):
                    module.requires_grad_(True)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


def _blocks(inner: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as config.num_hidden_layers."""
    n = getattr(inner.config, "num_hidden_layers", None)
    for module in inner.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(
        f"cannot find the {n} transformer blocks of {type(inner).__name__}; use --trainable-layers -1"
    )


def _millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
