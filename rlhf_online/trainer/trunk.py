"""The frozen trunk of a top_layers policy, run once per round instead of once per PPO step.

In top_layers mode only the top k blocks (and the final norm, head and value head) train; the embeddings
and the blocks below never change during a round, so their output for a rollout is the same at every PPO
step. The experience pass (old log-probs and values, a full forward anyway) keeps the input of the first
trainable block; each PPO step then runs the top k blocks only, fed that hidden state as `inputs_embeds`.
On SmolLM2-135M with the top 4 of 30 blocks trainable this cuts the forward pass of a step by about 85%.
The reference shares those frozen blocks weight for weight (the trainer never changes them), so its
log-probs too come from its top blocks on the same trunk (`common_trunk` checks, it does not assume).

It relies on the model's forward treating `inputs_embeds` as the first block's input (Llama, Mistral, Qwen,
SmolLM do; GPT-2 adds position embeddings, Gemma scales it), so `matches` checks it on the first minibatch of
every round, before any update, against the full forward's log-probs; where they differ the round runs
without the trunk.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a Llama/Mistral/Qwen-style (`model.layers`) or GPT-2-style model."""
    for owner, name in (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers")):
        base = getattr(lm, owner, None)
        if base is not None and isinstance(getattr(base, name, None), nn.ModuleList):
            return getattr(base, name)
    raise ValueError(
        f"cannot find the decoder layers of {type(lm).__name__}; use --train-mode lora for this architecture"
    )


TOLERANCE = 1e-3  # |log-prob difference| allowed between the two paths (float32 reorderings are ~1e-5)


def trunk_split(lm: nn.Module, top_blocks: int) -> int:
    """How many bottom blocks are frozen (0: no trunk worth keeping, every block trains)."""
    try:
        n = len(decoder_layers(lm))
    except ValueError:
        return 0
    return max(0, n - top_blocks)


@contextlib.contextmanager
def capture_trunk(lm: nn.Module, split: int) -> Iterator[list[torch.Tensor]]:
    """Collects, during the forward passes inside the block, the input of block `split`: one (b, L, H)
    tensor per forward call."""
    captured: list[torch.Tensor] = []
    block = decoder_layers(lm)[split - 1]

    def keep(_module: nn.Module, _inputs: tuple, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden.detach())

    handle = block.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def top_blocks_only(lm: nn.Module, split: int) -> Iterator[None]:
    """Inside the block, the model's forward runs blocks `split`.. only (the rest are set aside)."""
    layers = decoder_layers(lm)
    owner = next(m for m in lm.modules() if any(child is layers for child in m.children()))
    name = next(n for n, child in owner.named_children() if child is layers)
    setattr(owner, name, nn.ModuleList(list(layers)[split:]))
    try:
        yield
    finally:
        setattr(owner, name, layers)


def matches(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the trunk path's log-probs (b, T) equal the full forward's on the response tokens."""
    return bool(((new_logprobs - old_logprobs).abs() * mask).max() <= TOLERANCE)


def common_trunk(a: nn.Module, b: nn.Module) -> int:
    """How many bottom blocks two models share weight for weight, with their embeddings (0: none, or not
    the same architecture): what the reference and a policy trained in top_layers mode have in common."""
    if type(a) is not type(b):
        return 0
    try:
        blocks_a, blocks_b = decoder_layers(a), decoder_layers(b)
    except ValueError:
        return 0
    if len(blocks_a) != len(blocks_b) or not _same(a.get_input_embeddings(), b.get_input_embeddings()):
        return 0
    shared = 0
    for x, y in zip(blocks_a, blocks_b, strict=True):
        if not _same(x, y):
            break
        shared += 1
    return shared


def _same(x: nn.Module, y: nn.Module) -> bool:
    px, py = list(x.parameters()), list(y.parameters())
    if len(px) != len(py):
        return False
    return all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(px, py, strict=True))
