"""Next-token choice for a batch whose rows each have their own temperature, top-p and random generator,
and the batch padding that lets rows of different lengths decode together."""

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligns token sequences so every row's next token is in the last column.

    Returns:
        input_ids (B, T) padded with `pad_id` on the left, attention_mask (B, T) with 0 over the padding.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, so padding does not shift RoPE.  # (B, T)"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), per row.

    Keeps the smallest set of most likely tokens whose mass reaches `top_p` (always at least the top token)
    and renormalises.

    Args:
        probs: (B, V) rows summing to 1.
        top_p: (B,) in (0, 1].
    Returns:
        (B, V) filtered, renormalised probabilities.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of the tokens ranked above
    drop_sorted = mass_before >= top_p[:, None]  # the top token has mass_before 0, so it is always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row: argmax where temperature is 0, else a top-p sample at that temperature.

    Each sampling row draws from its own generator (None: the global RNG), so a seeded request picks the
    same tokens whatever else is in its batch.

    Args:
        logits: (B, V) float32 next-token logits.
        temperature: (B,) >= 0.
        top_p: (B,) in (0, 1].
        generators: B generators on the logits' device, or None.
    Returns:
        (B,) token ids.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    sampled = (temperature > 0).nonzero().flatten().tolist()
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    probs = torch.softmax(logits[rows] / temperature[rows, None], dim=-1)  # (S, V)
    probs = top_p_filter(probs, top_p[rows])
    for k, row in enumerate(sampled):
        tokens[row] = torch.multinomial(probs[k], 1, generator=generators[row])[0]
    return tokens


def check_fits(prompt_ids: list[int], max_new_tokens: int, context_length: int) -> None:
    """Refuses a request the model cannot hold (every engine checks the same way).

    Raises:
        ValueError: an empty prompt, or prompt plus max_new_tokens longer than the context.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; encode at least one token (see encode_chat)")
    if len(prompt_ids) + max_new_tokens > context_length:
        raise ValueError(
            f"{len(prompt_ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
            f"context of {context_length} tokens; shorten the prompt or lower max_new_tokens"
        )


def pad_id(tokenizer) -> int:
    """The id to pad with: the pad token, else eos (a GGUF import has no pad token), else 0. Padding is
    masked out, so any id serves; it only has to exist."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back text that is not complete yet.

    A byte-level tokenizer can split one character over several tokens; their partial decode ends in U+FFFD,
    so the piece waits for the next token (the same approach as text-generation-inference).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts a few tokens back, so merges across the boundary are right
        self.read_offset = 0  # tokens up to here have been emitted as text
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Adds one token; returns the new complete text ("" if none yet)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.emitted += text[len(prefix) :]
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text held back so far, once no more tokens will come."""
        text = self.text()
        rest = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += rest
        return rest

    def text(self) -> str:
        """The whole text decoded so far, without a character whose bytes were cut off (an answer that hit
        max_new_tokens inside a multi-byte character ends before it, instead of with U+FFFD)."""
        return self._decode(self.ids).removesuffix("\ufffd")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
