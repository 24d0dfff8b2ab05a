"""The policy engine: sampling and KV-cache batch operations on hand-written tensors, then continuous
batching (joining, leaving, caps), streaming, stops, cancel, swap under load and shutdown on the tiny model
(CPU, fp32).

Requests that must arrive while a batch runs are submitted from the worker's step hook, at a chosen step, so
every assertion is about the order of events, never about time."""

import asyncio
import copy
import gc
import threading
import weakref

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoTokenizer, DynamicCache

import rlhf_online.engine.engine as engine_module
from rlhf_online.engine.batch import DecodeBatch, attention_bias, concatenate, decode_step, prefill, select
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

    cut = IncrementalDecoder(Bytes())  # max_new_tokens ends the answer inside a two-byte character
    pieces = [cut.push(b) for b in "aé".encode()[:2]]
    assert pieces == ["a", ""]
    assert cut.flush() == "" and cut.text() == "a"  # no U+FFFD at the end


# KV-cache batch operations.


def hand_batch(keys: list[list[float]], mask: list[list[int]], tag: str) -> DecodeBatch:
    """A one-layer, one-head batch whose keys (B, 1, T, 1) are the given numbers, values their negatives."""
    k = torch.tensor(keys)[:, None, :, None]  # (B, 1, T, 1)
    n = len(keys)
    return DecodeBatch(
        rows=[f"{tag}{i}" for i in range(n)],
        cache=DynamicCache(ddp_cache_data=[(k, -k)]),
        mask=torch.tensor(mask),
        next_tokens=torch.arange(n),
        temperature=torch.zeros(n),
        top_p=torch.ones(n),
    )


def keys_of(batch: DecodeBatch) -> list[list[float]]:
    return batch.cache.layers[0].keys[:, 0, :, 0].tolist()


def test_concatenate_left_pads_the_narrower_batch_and_masks_the_padding():
    wide = hand_batch([[1.0, 2.0, 3.0], [0.0, 4.0, 5.0]], [[1, 1, 1], [0, 1, 1]], "a")
    narrow = hand_batch([[6.0]], [[1]], "b")
    joined = concatenate(wide, narrow)
    assert joined.rows == ["a0", "a1", "b0"] and joined.width == 3
    assert keys_of(joined) == [[1.0, 2.0, 3.0], [0.0, 4.0, 5.0], [0.0, 0.0, 6.0]]
    assert joined.cache.layers[0].values[2, 0, :, 0].tolist() == [0.0, 0.0, -6.0]
    assert joined.mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert joined.next_tokens.tolist() == [0, 1, 0]


def test_attention_bias_is_causal_and_closed_over_padding():
    low = torch.finfo(torch.float32).min
    bias = attention_bias(
        torch.tensor([[0, 1, 1], [1, 1, 1]]), queries=2, dtype=torch.float32
    )  # (2, 1, 2, 3)
    assert bias[0, 0].tolist() == [[low, 0.0, low], [low, 0.0, 0.0]]
    assert bias[1, 0].tolist() == [[0.0, 0.0, low], [0.0, 0.0, 0.0]]
    assert attention_bias(torch.tensor([[0, 1]]), 1, torch.float32).tolist() == [[[[low, 0.0]]]]


def test_select_drops_rows_and_the_columns_only_they_used():
    batch = hand_batch(
        [[1.0, 2.0, 3.0], [0.0, 4.0, 5.0], [0.0, 0.0, 6.0]], [[1, 1, 1], [0, 1, 1], [0, 0, 1]], "r"
    )
    select(batch, [2, 1])
    assert batch.rows == ["r2", "r1"] and batch.width == 2  # the first column was the leaving row's alone
    assert keys_of(batch) == [[0.0, 6.0], [4.0, 5.0]] and batch.mask.tolist() == [[0, 1], [1, 1]]
    assert batch.next_tokens.tolist() == [2, 1]
    select(batch, [0])
    assert keys_of(batch) == [[6.0]] and batch.mask.tolist() == [[1]]


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


def submit(engine: PolicyEngine, prompt: str, params: SamplingParams):
    return engine.submit(engine.tokenizer.encode(prompt), params)


def run_with_hook(engine: PolicyEngine, first: list, hook) -> list[list]:
    """Submits `first` (prompt, params) pairs, starts the engine with `hook(step, streams)` as its step hook
    (it may append to `streams`), waits for the hook to return True, then collects every stream's events."""
    streams, hooked = [], threading.Event()

    def step_hook(step: int) -> None:
        if hook(step, streams):
            hooked.set()

    async def go():
        streams.extend(submit(engine, p, params) for p, params in first)
        engine.step_hook = step_hook
        engine.start()
        assert await asyncio.to_thread(hooked.wait, 120)
        return [await collect(stream) for stream in streams]

    return asyncio.run(go())


def test_rows_joined_into_a_batch_decode_as_they_would_alone(model, tokenizer):
    def start(prompt: str) -> DecodeBatch:
        cache, mask, logits = prefill(
            model, [tokenizer.encode(prompt)], tokenizer.pad_token_id, torch.device("cpu")
        )
        return DecodeBatch([prompt], cache, mask, logits.argmax(-1), torch.zeros(1), torch.ones(1))

    def two_steps_alone(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        batch = start(prompt)
        first = decode_step(model, batch)  # (1, V)
        batch.next_tokens = first.argmax(-1)
        return first[0], decode_step(model, batch)[0]

    with torch.inference_mode():
        want_long, want_short = two_steps_alone(PROMPTS[4]), two_steps_alone(PROMPTS[0])
        joined = concatenate(start(PROMPTS[4]), start(PROMPTS[0]))  # the short row is left-padded
        first = decode_step(model, joined)  # (2, V)
        torch.testing.assert_close(first[0], want_long[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(first[1], want_short[0], atol=1e-5, rtol=1e-4)
        joined.next_tokens = first.argmax(-1)
        select(joined, [1])  # the long row leaves, and so does the padding only it needed
        assert joined.width == len(PROMPTS[0]) + 1
        torch.testing.assert_close(decode_step(model, joined)[0], want_short[1], atol=1e-5, rtol=1e-4)


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


def test_seeded_sampling_is_reproducible_when_it_joins_a_busy_batch(make_engine):
    target = (PROMPTS[2], sampled(24, seed=7))
    solo = alone(make_engine, *target)
    engine = make_engine()
    mates = [(PROMPTS[4], sampled(60, seed=1)), (PROMPTS[0], greedy(9)), (PROMPTS[1], sampled(40, seed=None))]

    def hook(step: int, streams: list) -> bool:
        if step == 4:  # joins rows 6 tokens longer than its prompt, so it is padded on the left
            streams.append(submit(engine, *target))
        if step == 7:  # a later newcomer joins the target's batch
            streams.append(submit(engine, PROMPTS[3], sampled(20, seed=3)))
        return step == 7

    events = run_with_hook(engine, mates, hook)
    assert events[3][-1] == solo
    assert engine.prefills_run == 3 and engine.largest_batch_seen == 4  # the 9-token mate had left


def test_rows_are_capped_at_max_batch_size_and_a_freed_row_is_refilled(make_engine):
    engine = make_engine(max_batch_size=4)
    done = run_all(engine, [(p, sampled(4, seed=i)) for i, p in enumerate(PROMPTS)])
    assert len(done) == 5 and engine.largest_batch_seen == 4 and engine.prefills_run == 2
    assert REGISTRY.get_sample_value("rlhf_inference_batch_size_count") >= 2


def test_a_request_joins_the_running_batch_and_finishes_before_it(make_engine):
    want_long, want_short = (
        alone(make_engine, PROMPTS[4], greedy(60)),
        alone(make_engine, PROMPTS[1], greedy(5)),
    )
    engine = make_engine()
    seen = []  # after each step: (rows per version, long finished, short finished)

    def hook(step: int, streams: list) -> bool:
        if step == 2:
            streams.append(submit(engine, PROMPTS[1], greedy(5)))
        done = [s.finished is not None for s in streams]
        seen.append((dict(engine.rows_by_version), done[0], len(done) > 1 and done[1]))
        return len(streams) == 2

    (*_, long_done), (*_, short_done) = run_with_hook(engine, [(PROMPTS[4], greedy(60))], hook)
    assert {"v1": 2} in [running for running, _, _ in seen]  # decoded together
    assert ({"v1": 1}, False, True) in seen  # the newcomer was done while the first one still ran
    assert (long_done, short_done) == (want_long, want_short)


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
    assert engine.prefills_run == 1 and engine.largest_batch_seen == 1


def test_cancel_inside_a_batch_frees_its_row_for_a_waiting_request(make_engine):
    mate, waiting = (PROMPTS[4], sampled(30, seed=4)), (PROMPTS[1], sampled(10, seed=5))
    want_mate, want_waiting = alone(make_engine, *mate), alone(make_engine, *waiting)
    engine = make_engine(max_batch_size=2)
    seen = []  # after each step: (rows running, mate finished, waiting finished)

    def hook(step: int, streams: list) -> bool:
        if step == 1:
            streams[0].cancel()
        seen.append((sum(engine.rows_by_version.values()), *(s.finished is not None for s in streams[1:])))
        return step == 1

    long_events, mate_events, waiting_events = run_with_hook(
        engine, [(PROMPTS[0], sampled(400, seed=1)), mate, waiting], hook
    )
    assert long_events == [] and max(rows for rows, _, _ in seen) == 2
    assert (1, False, True) in seen  # the waiting request took the freed row and ended first
    assert (mate_events[-1], waiting_events[-1]) == (want_mate, want_waiting)  # the others are intact
    engine.stop(timeout=30)  # joins the worker, so its last step hook has run
    assert seen[-1] == (0, True, True) and len(seen) < 400  # the batch ended with the mate


def test_swap_serves_newcomers_at_once_while_running_rows_finish_on_the_old_model(make_engine, model_v2):
    params = sampled(12, seed=9)
    want_v1 = alone(make_engine, PROMPTS[2], params)
    want_v2 = alone(make_engine, PROMPTS[2], params, m=model_v2, version="v2")
    assert want_v1.text != want_v2.text
    engine = make_engine()
    seen = []

    def hook(step: int, streams: list) -> bool:
        if step == 2:
            engine.swap(model_v2, "v2")
            streams.append(submit(engine, PROMPTS[2], params))
        seen.append((engine.version, dict(engine.rows_by_version)))
        return step == 2

    (*_, first_done), (*_, late_done) = run_with_hook(engine, [(PROMPTS[2], params)], hook)
    assert seen[2][0] == "v2" and ("v2", {"v1": 1, "v2": 1}) in seen  # no pause: both versions decoded
    assert (first_done, late_done) == (want_v1, want_v2)
    assert engine.wait_swapped("v2", timeout=0) and engine.version == "v2"
    assert REGISTRY.get_sample_value("rlhf_inference_model_version_info", {"version": "v2"}) == 1
    assert REGISTRY.get_sample_value("rlhf_inference_model_version_info", {"version": "v1"}) is None


def test_every_answer_comes_from_one_version_across_a_swap_under_continuous_load(
    make_engine, model, model_v2
):
    jobs = [(PROMPTS[i % 5], sampled(6 + 3 * (i % 4), seed=i)) for i in range(16)]
    want = {
        (i, version): alone(make_engine, *job, m=m, version=version)
        for i, job in enumerate(jobs)
        for version, m in (("v1", model), ("v2", model_v2))
    }
    assert all(want[i, "v1"].text != want[i, "v2"].text for i in range(len(jobs)))
    engine = make_engine(m=copy.deepcopy(model), max_batch_size=16)
    old_model = weakref.ref(engine._model)
    seen = []

    def hook(step: int, streams: list) -> bool:
        if step == 5:
            engine.swap(model_v2, "v2")
        if step + 1 < len(jobs):  # one new request per step, before and after the swap
            streams.append(submit(engine, *jobs[step + 1]))
        seen.append(dict(engine.rows_by_version))
        return step + 2 == len(jobs)

    done = [events[-1] for events in run_with_hook(engine, jobs[:1], hook)]
    assert [f.model_version for f in done] == ["v1"] * 6 + ["v2"] * 10  # the version at its start
    assert all(f == want[i, f.model_version] for i, f in enumerate(done))  # every token from that version
    with_v1 = [i for i, running in enumerate(seen) if "v1" in running]
    assert any("v2" in seen[i] for i in with_v1)  # old rows went on while new ones ran
    assert with_v1 == list(range(len(with_v1)))  # and once the last old row left, v1 never came back
    gc.collect()
    assert old_model() is None  # the old model was dropped with its last row


def test_a_request_waits_while_it_would_exceed_the_token_cap(make_engine):
    prompt = "x" * 250  # 250 tokens; with 40 new ones each request reserves 290
    engine = make_engine(max_batch_tokens=560)
    done = run_all(engine, [(prompt, greedy(40)), (prompt, greedy(40)), (PROMPTS[0], greedy(3))])
    assert [f.completion_tokens for f in done] == [40, 40, 3]
    assert engine.largest_batch_seen == 2 and engine.prefills_run == 2  # the second, then the third behind it
    roomy = make_engine(max_batch_tokens=600)
    run_all(roomy, [(prompt, greedy(40)), (prompt, greedy(40)), (PROMPTS[0], greedy(3))])
    assert roomy.largest_batch_seen == 3 and roomy.prefills_run == 1


def test_the_token_cap_must_fit_a_request_as_long_as_the_context(make_engine):
    with pytest.raises(ValueError, match="at least 512"):
        make_engine(max_batch_tokens=511)


def test_a_failed_decoding_step_fails_its_rows_and_the_engine_goes_on(make_engine, monkeypatch):
    calls = []

    def fail_once(model, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return decode_step(model, batch)

    monkeypatch.setattr(engine_module, "decode_step", fail_once)
    engine = make_engine()
    engine.start()
    with pytest.raises(RuntimeError, match="generation failed on the server: out of memory"):
        submit(engine, PROMPTS[0], greedy(5)).result(timeout=60)
    assert submit(engine, PROMPTS[0], greedy(5)).result(timeout=60).completion_tokens == 5


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
