"""The tiny model and its character-level tokenizer: round trip, determinism, and loading through Auto*."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_online.engine.tiny_model import PRESETS, main, write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_ascii_text_round_trips_exactly(tokenizer):
    every_character = "".join(chr(c) for c in range(32, 127)) + "\t\n"
    text = "  Hello,  world!\n\tx = [1, 2] ~ {a}  \n\n" + every_character
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(" ")) == " "


def test_special_tokens_and_unknown_characters(tokenizer):
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == [
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    ]
    assert tokenizer.encode("é") == [tokenizer.unk_token_id]
    ids = [tokenizer.eos_token_id, *tokenizer.encode("ab"), tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    assert len(tokenizer) == 4 + 2 + 95  # specials, tab and newline, printable ASCII


def test_chat_template_marks_each_turn(tokenizer):
    conversation = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nbe kind\n<|user|>\nhi\n<|assistant|>\n"
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt


def test_loads_with_the_auto_classes(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert 2_000_000 <= model.num_parameters() <= 3_000_000
    assert model.config.vocab_size == len(tokenizer) and model.config.max_position_embeddings == 512
    ids = (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    assert ids == (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    batch = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert reward(**batch).logits.shape == (2, 1)  # batches need pad_token_id in the config


def test_same_seed_writes_identical_weights(tmp_path, model_dir):
    same = write_tiny_model(tmp_path / "same", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    weights = (model_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_writing_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_model(tmp_path / "m", seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_init_model_command(tmp_path):
    assert main(["--preset", "tiny", str(tmp_path / "cli"), "--seed", "2"], {}) == 0
    written = {p.name for p in (tmp_path / "cli").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= written
    assert list(PRESETS) == ["tiny"]
    with pytest.raises(SystemExit):
        main(["--preset", "huge", str(tmp_path / "x")], {})
    with pytest.raises(ValueError, match="choose one of tiny"):
        write_tiny_model(tmp_path / "y", preset="huge")
