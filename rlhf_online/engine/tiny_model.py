"""A small randomly initialised Llama and a character-level tokenizer, built offline, for tests and the demo.

    rlhf-online init-model --preset tiny .rlhf/tiny-model            # ~2.7M parameters
    rlhf-online init-model --preset tiny DIR --seed 3                # another, different initialisation

In Python: `write_tiny_model(path, seed=0)`. The folder loads with `AutoModelForCausalLM`, `AutoTokenizer`
and `AutoModelForSequenceClassification(num_labels=1)` (the reward model starts from it). Nothing is
downloaded, and the same seed writes byte-identical weights.
"""

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Tab, newline and printable ASCII (space .. ~): every other character is <unk>.
CHARACTERS = ("\t", "\n", *(chr(c) for c in range(32, 127)))
# One turn per role marker; the markers are plain ASCII, so they tokenize like any other text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# The PPO learning rate of the tiny preset (random weights, 2.6M parameters): what the demo and the tests give
# the trainer. Pretrained models need far smaller steps (the trainer's default).
TINY_LEARNING_RATE = 5e-4


@dataclass(frozen=True)
class Preset:
    """Architecture of a preset; the vocabulary is always the character set above."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
    ),
}


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character; `decode(encode(text)) == text` for ASCII text."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, preset: Preset, seed: int) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM; initialisation depends on `seed` only."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Leaves the caller's global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def write_tiny_model(path: Path, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Writes a model of the named preset and its tokenizer into `path` (created if needed); returns it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = PRESETS[preset]
    tokenizer = build_tokenizer(arch.max_position_embeddings)
    model = build_model(tokenizer, arch, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    log.info("wrote the %s model (%d parameters, seed %d) to %s", preset, model.num_parameters(), seed, path)
    return path


def is_tiny_preset(path: str | Path) -> bool:
    """Whether the model folder has the tiny preset's architecture and vocabulary (however it was trained
    since), so tools can pick settings sized for it."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    preset = PRESETS["tiny"]
    return config.get("vocab_size") == len(SPECIAL_TOKENS) + len(CHARACTERS) and all(
        config.get(name) == value for name, value in vars(preset).items()
    )


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """`rlhf-online init-model --preset tiny DIR [--seed N]`."""
    parser = argparse.ArgumentParser(prog="rlhf-online init-model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder to write the model and tokenizer into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    write_tiny_model(args.dir, seed=args.seed, preset=args.preset)
    return 0
