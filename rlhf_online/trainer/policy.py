"""The trained policy: a causal LM with a value head, only its top layers (or LoRA adapters) trainable.

Serving loads plain Hugging Face checkpoints, so `export_model` merges LoRA adapters into the weights
(`merge_and_unload`) before publishing; the value head travels beside the weights as `value_head.safetensors`
(ignored by `from_pretrained`) so the next round's critic starts where this one stopped.
"""

import contextlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf_online.trainer.trunk import decoder_layers, top_blocks_only, trunk_split

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """`lm` (a causal LM, maybe wrapped by peft) plus a linear value head on its last hidden state."""

    def __init__(self, lm: nn.Module, value_head: nn.Linear, trunk_split: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.trunk_split = trunk_split  # frozen bottom blocks whose output can be kept (see trainer.trunk)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        n_last: int,
        trunk: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values at the last `n_last` positions.

        Args:
            input_ids, attention_mask, position_ids: (B, L).
            n_last: positions to keep, counted from the end.
            trunk: (B, L, H) the frozen blocks' output for these inputs (`trainer.trunk`): only the blocks
                above `trunk_split` run.
        Returns:
            logits: (B, n_last, V); values: (B, n_last).
        """
        inputs = {"input_ids": input_ids} if trunk is None else {"inputs_embeds": trunk}
        with contextlib.nullcontext() if trunk is None else top_blocks_only(self.lm, self.trunk_split):
            out = self.lm(
                **inputs,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
                logits_to_keep=n_last,
                use_cache=False,
            )
        hidden = out.hidden_states[-1][:, -n_last:]  # (B, n_last, H), after the final norm
        values = self.value_head(hidden.float()).squeeze(-1)  # (B, n_last)
        return out.logits, values


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A plain causal LM in float32 from a model folder (call `Registry.verify` first)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device)


def load_reference(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The frozen reference policy: eval mode, no gradients."""
    model = load_causal_lm(path, device).eval()
    model.requires_grad_(False)
    return model


def final_norm(lm: PreTrainedModel) -> nn.Module | None:
    """The norm after the last block (Llama `model.norm`, GPT-2 `transformer.ln_f`), if any."""
    for owner, name in (("model", "norm"), ("transformer", "ln_f"), ("gpt_neox", "final_layer_norm")):
        module = getattr(getattr(lm, owner, None), name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def freeze_all_but_top_layers(lm: PreTrainedModel, n_layers: int) -> None:
    """Freezes everything except the top `n_layers` blocks and the final norm (embeddings and head stay)."""
    lm.requires_grad_(False)
    layers = decoder_layers(lm)
    for block in layers[max(0, len(layers) - n_layers) :]:
        block.requires_grad_(True)
    norm = final_norm(lm)
    if norm is not None:
        norm.requires_grad_(True)


def add_lora(lm: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wraps `lm` with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(lm, config)


def load_value_head(folder: str | Path, hidden_size: int) -> nn.Linear:
    """The value head saved beside a policy version, else a fresh zero one (V = 0 everywhere)."""
    head = nn.Linear(hidden_size, 1)
    path = Path(folder) / VALUE_HEAD_FILE
    if path.is_file():
        state = load_file(path)
        if state.get("weight") is not None and state["weight"].shape == head.weight.shape:
            head.load_state_dict(state)
            return head
        log.warning("ignoring %s: shape does not match hidden size %d", path, hidden_size)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def build_policy(
    folder: str | Path, *, device: str | torch.device = "cpu", **training
) -> PolicyWithValueHead:
    """Loads a policy version for training, plus its value head; `training` is `trainable_policy`'s options
    (train_mode, trainable_layers, lora_*)."""
    lm = load_causal_lm(folder, device)
    head = load_value_head(folder, lm.config.hidden_size).to(device)
    policy = trainable_policy(lm, head, **training)
    log.info("policy from %s: %s", folder, describe(policy, training["train_mode"]))
    return policy


def trainable_policy(
    lm: PreTrainedModel,
    head: nn.Linear,
    *,
    train_mode: str,
    trainable_layers: int,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | None = None,
) -> PolicyWithValueHead:
    """A plain causal LM (loaded, or a candidate an earlier round exported) made ready to train."""
    split = 0
    if train_mode == "top_layers":
        freeze_all_but_top_layers(lm, trainable_layers)
        split = trunk_split(lm, trainable_layers)
    elif train_mode == "lora":
        targets = lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
        lm = add_lora(lm, lora_r, lora_alpha, lora_dropout, targets)
    else:
        raise ValueError(f"unknown train_mode {train_mode!r}; use 'top_layers' or 'lora'")
    head.requires_grad_(True)
    return PolicyWithValueHead(lm, head, split)


def describe(policy: PolicyWithValueHead, train_mode: str) -> str:
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in policy.parameters())
    return f"{train_mode}, {n_train} of {n_all} parameters trainable"


def export_model(policy: PolicyWithValueHead) -> PreTrainedModel:
    """The plain causal LM to publish: LoRA merged into the weights. The policy must not train afterwards."""
    lm = policy.lm
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
        policy.lm = lm
    lm.requires_grad_(False)
    return lm.eval()


def value_head_bytes(policy: PolicyWithValueHead) -> bytes:
    """The value head as safetensors bytes, published beside the model as `value_head.safetensors`."""
    return save({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()})


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that hold NaN or inf (an empty list means the weights are sane)."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
