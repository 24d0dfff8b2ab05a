"""The policy engine: sampling math on hand-written tensors, then batching, streaming, stops, cancel, swap and
shutdown on the tiny model (CPU, fp32)."""

import asyncio
import copy
import threading

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from rlhf_online.engine.engine import (
    EngineStopped,
    Finished,
    PolicyEngine,
    QueueFull,
    SamplingParams,
    TextDelta,
    load_policy,
)
from rlhf_online.engine.sampling import (
    IncrementalDecoder,
    choose_tokens,
    left_pad,
    position_ids,
    top_p_filter,
)
from rlhf_online.engine.tiny_model import write_tiny_model

PROMPTS = ["hi", "What is 2+2?", "<|user|>\nhello\n<|assistant|>\n", "zzz~~", "The quick brown fox"]


# Sampling math.


def test_left_pad_right_aligns_and_positions_start_at_each_rows_first_token():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    filtered = top_p_filter(probs, torch.tensor([0.8, 0.5, 1.0]))
    torch.testing.assert_close(filtered[0], torch.tensor([0.0, 0.625, 0.375, 0.0]))
    torch.testing.assert_close(filtered[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # the top token always stays
    torch.testing.assert_close(filtered[2], probs[2])


def test_choose_tokens_is_argmax_at_temperature_zero_and_follows_each_rows_generator():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    greedy = choose_tokens(logits, torch.zeros(3), torch.ones(3), [None] * 3)
    assert greedy.tolist() == [1, 0, 0]

    def sample(seed_of_row_2: int, other_rows_temperature: float) -> int:
        gens = [torch.Generator().manual_seed(s) for s in (11, 12, seed_of_row_2)]
        temps = torch.tensor([other_rows_temperature, other_rows_temperature, 1.0])
        return choose_tokens(logits, temps, torch.ones(3), gens)[2].item()

    draws = [sample(seed, 1.0) for seed in range(20)]
    assert len(set(draws)) > 1  # uniform logits: different seeds pick different tokens
    assert draws == [sample(seed, 0.0) for seed in range(20)]  # the other rows do not matter


def test_incremental_decoder_holds_back_incomplete_characters():
    class Bytes:  # a byte-level "tokenizer": token i is byte i
        def decode(self, ids, **kw):
            return bytes(ids).decode("utf-8", errors="replace")

    decoder = IncrementalDecoder(Bytes())
    pieces = [decoder.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]
    assert decoder.flush() == "" and decoder.text() == "é!"


# The engine on the tiny model.


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-models")
    return write_tiny_model(root / "v1", seed=0), write_tiny_model(root / "v2", seed=1)


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return AutoTokenizer.from_pretrained(model_dirs[0])


@pytest.fixture(scope="module")
def model(model_dirs):
    return load_policy(model_dirs[0])


@pytest.fixture(scope="module")
def model_v2(model_dirs):
    return load_policy(model_dirs[1])


@pytest.fixture
def make_engine(model, tokenizer):
    engines = []

    def make(m=None, version="v1", **kw) -> PolicyEngine:
        engine = PolicyEngine(m or model, tokenizer, version, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=5)


async def collect(stream) -> list:
    return [event async for event in stream]


def run_all(engine: PolicyEngine, requests: list[tuple[str, SamplingParams]]) -> list[Finished]:
    """Submits every request before the worker starts, so they run as one batch; returns their Finished."""

    async def go():
        streams = [engine.submit(engine.tokenizer.encode(p), params) for p, params in requests]
        engine.start()
        return [(await collect(s))[-1] for s in streams]

    return asyncio.run(go())


def alone(make_engine, prompt: str, params: SamplingParams, **kw) -> Finished:
    return run_all(make_engine(**kw), [(prompt, params)])[0]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_p=1.0, seed=None)


def sampled(n: int, seed: int | None, top_p: float = 0.95) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, top_p=top_p, seed=seed)


def test_stream_yields_text_deltas_then_one_finished(make_engine):
    engine = make_engine()
    prompt_ids = engine.encode_chat([("system", "be brief"), ("user", "hello")])
    assert engine.tokenizer.decode(prompt_ids) == "<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\n"

    async def go():
        engine.start()
        return await collect(engine.submit(prompt_ids, sampled(16, seed=3)))

    events = asyncio.run(go())
    *deltas, done = events
    assert all(isinstance(e, TextDelta) for e in deltas) and len(deltas) > 1
    assert isinstance(done, Finished) and "".join(d.text for d in deltas) == done.text
    assert (done.model_version, done.prompt_tokens, done.completion_tokens) == ("v1", len(prompt_ids), 16)
    assert done.finish_reason == "length"


def test_greedy_is_deterministic(make_engine):
    first = alone(make_engine, PROMPTS[3], greedy(12))
    assert alone(make_engine, PROMPTS[3], greedy(12)) == first


def test_greedy_batched_equals_alone(make_engine):
    lengths = [12, 5, 20, 1, 9]  # rows finish at different steps and leave the batch
    solo = [alone(make_engine, p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)]
    engine = make_engine()
    batched = run_all(engine, [(p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)])
    assert engine.largest_batch_seen == len(PROMPTS)
    assert [f.text for f in batched] == [f.text for f in solo]
    assert len({f.text[:1] for f in solo}) > 1  # the prompts really lead to different answers


def test_seeded_sampling_is_reproducible_whatever_its_batch_mates(make_engine):
    target = (PROMPTS[2], sampled(24, seed=7))
    solo = alone(make_engine, *target)
    mates = [(PROMPTS[0], sampled(30, seed=1)), (PROMPTS[4], greedy(3)), (PROMPTS[1], sampled(8, seed=None))]
    batched = run_all(make_engine(), [mates[0], target, *mates[1:]])
    assert batched[1] == solo
    assert alone(make_engine, PROMPTS[2], sampled(24, seed=8)).text != solo.text


def test_requests_waiting_together_run_as_one_batch(make_engine):
    engine = make_engine(max_batch_size=4)
    done = run_all(engine, [(p, sampled(4, seed=i)) for i, p in enumerate(PROMPTS)])
    assert len(done) == 5 and engine.largest_batch_seen == 4 and engine.batches_run == 2
    assert REGISTRY.get_sample_value("rlhf_inference_batch_size_count") >= 2


def test_max_new_tokens_ends_with_length(make_engine):
    done = alone(make_engine, PROMPTS[0], sampled(7, seed=2))
    assert (done.finish_reason, done.completion_tokens, done.prompt_tokens) == ("length", 7, len(PROMPTS[0]))


def test_a_stop_token_ends_with_stop_and_is_not_in_the_text(make_engine, model, tokenizer):
    params = sampled(40, seed=5)
    reference = alone(make_engine, PROMPTS[1], params)
    assert reference.completion_tokens == len(reference.text)  # one character per token, no specials
    k = next(i for i, c in enumerate(reference.text) if i >= 3 and c not in reference.text[:i])
    stopping = copy.deepcopy(model)
    stop_id = tokenizer.convert_tokens_to_ids(reference.text[k])
    stopping.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_id]
    done = alone(make_engine, PROMPTS[1], params, m=stopping)
    assert (done.finish_reason, done.text, done.completion_tokens) == ("stop", reference.text[:k], k + 1)


def test_queue_full_when_max_queue_requests_wait(make_engine):
    engine = make_engine(max_queue=2)
    for _ in range(2):
        engine.submit([5, 6], greedy(2))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit([5, 6], greedy(2))


def test_cancel_frees_a_queue_slot(make_engine):
    engine = make_engine(max_queue=1)

    async def go():
        first = engine.submit([5, 6], greedy(2))
        with pytest.raises(QueueFull):
            engine.submit([7, 8], greedy(2))
        await first.cancel()
        second = engine.submit([7, 8], greedy(2))
        engine.start()
        return await collect(first), await collect(second)

    first_events, second_events = asyncio.run(go())
    assert first_events == [] and isinstance(second_events[-1], Finished)
    assert engine.batches_run == 1 and engine.largest_batch_seen == 1


def test_cancel_removes_a_running_request_from_its_batch(make_engine):
    mate = (PROMPTS[4], sampled(10, seed=4))
    solo = alone(make_engine, *mate)
    engine = make_engine()
    steps = []

    async def go():
        long = engine.submit(engine.tokenizer.encode(PROMPTS[0]), sampled(400, seed=1))
        other = engine.submit(engine.tokenizer.encode(mate[0]), mate[1])
        engine.step_hook = lambda step: (steps.append(step), step == 1 and long.cancel())
        engine.start()
        return await collect(long), await collect(other)

    long_events, other_events = asyncio.run(go())
    engine.stop(timeout=30)  # the worker calls the hook once more after the mate's Finished
    assert not any(isinstance(e, Finished) for e in long_events)
    assert other_events[-1] == solo  # the batch went on without the cancelled row
    assert len(steps) == solo.completion_tokens  # the batch ended with the mate, long before 400 tokens


def test_swap_takes_effect_at_the_next_batch(make_engine, model_v2):
    params = sampled(12, seed=9)
    want_v1 = alone(make_engine, PROMPTS[2], params)
    want_v2 = alone(make_engine, PROMPTS[2], params, m=model_v2, version="v2")
    assert want_v1.text != want_v2.text
    engine = make_engine()
    late, seen = [], []

    def hook(step: int) -> None:
        if step == 2 and not late:  # once, in the first batch
            engine.swap(model_v2, "v2")
            seen.append(engine.version)  # still v1 while its batch runs
            late.append(engine.submit(engine.tokenizer.encode(PROMPTS[2]), params))

    async def go():
        engine.step_hook = hook
        first = engine.submit(engine.tokenizer.encode(PROMPTS[2]), params)
        engine.start()
        first_done = (await collect(first))[-1]
        return first_done, (await collect(late[0]))[-1]

    first_done, late_done = asyncio.run(go())
    assert seen == ["v1"] and first_done == want_v1
    assert late_done == want_v2 and engine.batches_run == 2
    assert engine.wait_swapped("v2", timeout=5) and engine.version == "v2"
    assert REGISTRY.get_sample_value("rlhf_inference_model_version_info", {"version": "v2"}) == 1
    assert REGISTRY.get_sample_value("rlhf_inference_model_version_info", {"version": "v1"}) is None


def test_swap_on_an_idle_engine_serves_at_once(make_engine, model_v2):
    engine = make_engine()
    engine.start()
    engine.swap(model_v2, "v2")
    assert engine.wait_swapped("v2", timeout=5)
    assert engine.submit([5, 6, 7], greedy(3)).result(timeout=60).model_version == "v2"


def test_stop_fails_waiting_requests_and_refuses_new_ones(make_engine):
    engine = make_engine()
    streams = [engine.submit([5, 6, 7], greedy(3)) for _ in range(2)]
    engine.stop(timeout=5)
    for stream in streams:
        with pytest.raises(EngineStopped):
            asyncio.run(collect(stream))
        with pytest.raises(EngineStopped):
            stream.result(timeout=1)
    with pytest.raises(EngineStopped):
        engine.submit([5, 6, 7], greedy(3))


def test_stop_lets_the_running_batch_finish_and_joins_the_worker(make_engine):
    engine = make_engine()
    running = threading.Event()
    engine.step_hook = lambda step: running.set()
    engine.start()
    stream = engine.submit([5, 6, 7], greedy(5))
    assert running.wait(timeout=60)
    engine.stop(timeout=30)
    assert stream.result(timeout=0).completion_tokens == 5
    assert not engine._thread.is_alive()


def test_stop_fails_a_batch_still_running_after_the_grace(make_engine):
    engine = make_engine()
    running, release = threading.Event(), threading.Event()
    engine.step_hook = lambda step: (running.set(), release.wait(timeout=60))
    engine.start()
    stream = engine.submit([5, 6, 7], greedy(50))
    assert running.wait(timeout=60)
    engine.stop(timeout=0.2)  # returns with the worker still held in the hook, past its grace
    release.set()
    with pytest.raises(EngineStopped):
        stream.result(timeout=60)
    engine._thread.join(timeout=60)
    assert not engine._thread.is_alive()


def test_submit_refuses_prompts_that_do_not_fit(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], greedy(3))
    with pytest.raises(ValueError, match="context of 512"):
        engine.submit([5] * 500, greedy(20))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=3, temperature=1.0, top_p=0.0, seed=None)
