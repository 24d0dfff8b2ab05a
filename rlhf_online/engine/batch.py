"""The KV-cache state of rows decoding together, and the three operations continuous batching needs on it.

A running batch keeps one Hugging Face `DynamicCache` whose rows are left-padded to a common width, with an
attention mask that is 0 over the padding. Newcomers are prefilled on their own (`prefill`), then joined to
the running batch by padding the narrower cache on the left (`concatenate`); rows that finish or are
cancelled leave at once (`select`), and columns that are padding in every remaining row are cut off, so the
cache stays as wide as its longest row. The same scheme as text-generation-inference's
`CausalLMBatch.concatenate`/`filter` (server/text_generation_server/models/causal_lm.py).

Positions are given explicitly (each row counts from 0 at its first real token), so padding never shifts a
row's rotary positions, and a row decodes the same tokens whatever else is in the batch. For the sdpa and
eager attention the 4D mask is built here (`attention_bias`): from a padded 2D mask, transformers 4.57 builds
it with `torch.vmap`, which took half of every step on the tiny model on CPU.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rlhf_online.engine.sampling import left_pad, position_ids


@dataclass(eq=False)
class DecodeBatch:
    """Rows decoding together on one model; every tensor has one row per entry of `rows`."""

    rows: list  # B opaque per-row records (the engine's), in tensor order
    cache: DynamicCache  # per layer keys and values (B, H, T, D)
    mask: torch.Tensor  # (B, T) 1 over each row's cached tokens, 0 over its left padding
    next_tokens: torch.Tensor  # (B,) each row's last chosen token: fed at the next step, not yet cached
    temperature: torch.Tensor  # (B,) >= 0
    top_p: torch.Tensor  # (B,) in (0, 1]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Cached columns per row, padding included (T)."""
        return self.mask.shape[1]


def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Runs the prompts through the model together, left-padded.

    Returns:
        cache: a DynamicCache with keys and values (B, H, T, D) for the prompts,
        mask: (B, T) attention mask over the cache,
        logits: (B, V) float32 next-token logits of each prompt.
    """
    input_ids, mask = left_pad(prompts, pad_id)  # (B, T)
    input_ids, mask = input_ids.to(device), mask.to(device)
    # A cache without the config holds every layer in full, so each can be padded and sliced alike.
    out = model(
        input_ids=input_ids,
        attention_mask=_model_mask(model, mask, input_ids.shape[1]),
        position_ids=position_ids(mask),
        past_key_values=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    check_cache(out.past_key_values)
    return out.past_key_values, mask, out.logits[:, -1, :].float()


def decode_step(model, batch: DecodeBatch) -> torch.Tensor:
    """Feeds every row its next token and grows the cache by one column.

    Returns:
        (B, V) float32 logits of the token after it.
    """
    positions = batch.mask.sum(dim=1, keepdim=True)  # (B, 1) cached real tokens = the new token's position
    mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)  # (B, T + 1)
    out = model(
        input_ids=batch.next_tokens[:, None],
        attention_mask=_model_mask(model, mask, 1),
        position_ids=positions,
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.mask = mask
    return out.logits[:, -1, :].float()


def select(batch: DecodeBatch, keep: Sequence[int]) -> None:
    """Keeps only the rows at indices `keep` (in that order), then cuts the columns that are padding in every
    row left (TGI's `filter`)."""
    if len(keep) == len(batch) and list(keep) == list(range(len(batch))):
        return
    index = torch.tensor(list(keep), dtype=torch.long, device=batch.mask.device)
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    batch.mask, batch.next_tokens = batch.mask[index], batch.next_tokens[index]
    batch.temperature, batch.top_p = batch.temperature[index], batch.top_p[index]
    batch.rows = [batch.rows[i] for i in keep]
    if keep:
        _trim_padding(batch)


def concatenate(a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
    """One batch with the rows of `a` then `b`, the narrower one padded on the left to the other's width
    (TGI's `concatenate`). Both must come from the same model."""
    width = max(a.width, b.width)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_pad_columns(la.keys, width), _pad_columns(lb.keys, width)], dim=0)
        la.values = torch.cat([_pad_columns(la.values, width), _pad_columns(lb.values, width)], dim=0)
    return DecodeBatch(
        rows=a.rows + b.rows,
        cache=a.cache,
        mask=torch.cat([_pad_mask(a.mask, width), _pad_mask(b.mask, width)], dim=0),  # (Ba + Bb, width)
        next_tokens=torch.cat([a.next_tokens, b.next_tokens]),
        temperature=torch.cat([a.temperature, b.temperature]),
        top_p=torch.cat([a.top_p, b.top_p]),
    )


def attention_bias(mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of the last `queries` of T positions: causal, and closed over padding.

    Args:
        mask: (B, T) 1 over real tokens, 0 over padding.
    Returns:
        (B, 1, queries, T): 0 where a query may attend, the dtype's minimum elsewhere (finite, so the query
        rows of padding do not turn into NaN).
    """
    t = mask.shape[1]
    keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if queries > 1:
        keep = keep & torch.ones((queries, t), dtype=torch.bool, device=mask.device).tril(
            t - queries
        )  # (Q, T)
    bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


def check_cache(cache) -> None:
    """Raises TypeError unless every layer is a full DynamicLayer with keys (B, H, T, D), the layout the
    operations above pad and slice."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(
        isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer)
        for layer in layers
    ):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or [type(cache).__name__]
        raise TypeError(
            f"continuous batching needs a DynamicCache of full DynamicLayers, the model returned {kinds}; "
            "use a model whose forward accepts past_key_values=DynamicCache()"
        )


def _model_mask(model, mask: torch.Tensor, queries: int) -> torch.Tensor:
    """The 4D bias for the attentions that take one; the 2D mask for the others (flash attention)."""
    if getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        return attention_bias(mask, queries, model.dtype)
    return mask


def _pad_columns(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros on the left."""
    b, h, t, d = states.shape
    if t == width:
        return states
    return torch.cat([states.new_zeros((b, h, width - t, d)), states], dim=2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) -> (B, width), zeros on the left."""
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=1)


def _trim_padding(batch: DecodeBatch) -> None:
    used = batch.mask.any(dim=0).nonzero()  # (n, 1) columns some row still attends to
    first = int(used[0, 0]) if len(used) else batch.width
    if first == 0:
        return
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    batch.mask = batch.mask[:, first:]
