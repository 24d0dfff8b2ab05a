"""Continuous batching against static batching and plain `model.generate`, side by side under the same load.

    .venv/bin/python benchmarks/engine_load.py                   # the tiny preset, written to a temp folder
    .venv/bin/python benchmarks/engine_load.py --model-dir DIR   # any Hugging Face causal-LM folder
    .venv/bin/python benchmarks/engine_load.py --swap            # also: the latency a hot swap adds

On one model, one machine and the same seeded request schedules per load (Poisson arrivals; prompt and answer
lengths drawn from mixed sets; greedy, so every engine computes the same answers), it replays the schedule
against three engines in alternation, round after round (so a machine whose load drifts treats them alike):
- continuous: `PolicyEngine`, iteration-level scheduling (newcomers join the running batch every step);
- static: `StaticPolicyEngine`, the engine before it (a batch runs to its end before the next one starts);
- generate: a static batcher that calls `model.generate` on the same batches (up to max_batch_size of the
  requests waiting; a batch decodes until its longest answer, and its callers get their answers at its end;
  its TTFT is when the batch's first token was computed, as a streamer would see it).
Loads are fractions of the capacity measured first (the continuous engine with every request arriving at
once), so the last fraction, 1.0, is saturation. Per load and engine: throughput (generated tokens per second
of the run), time to first token (TTFT) and end-to-end latency, p50/p95.

With --swap, at the --swap-load fraction a second model is swapped in half-way through the schedule, and the
requests in flight at the swap are compared with the same requests in a run without the swap.
"""

import argparse
import asyncio
import copy
import queue
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_server import percentile
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from rlhf_online.engine.engine import (
    Finished,
    PolicyEngine,
    SamplingParams,
    TextDelta,
    _pad_id,
    _stop_ids,
    load_policy,
)
from rlhf_online.engine.static_engine import StaticPolicyEngine
from rlhf_online.engine.tiny_model import write_tiny_model

KINDS = ("continuous", "static", "generate")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "count",
    "stars",
    "above",
    "hills",
]


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the start of the run
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class Result:
    arrival: float  # time.perf_counter()
    first: float  # first token
    end: float  # the caller has the whole answer
    tokens: int  # generated, the stop token included
    version: str = ""


@dataclass(frozen=True)
class Figures:
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    e2e_p50: float
    e2e_p95: float


# The workload.


def prompt_of_length(engine: PolicyEngine, tokens: int) -> list[int]:
    """A chat prompt of at least `tokens` tokens, made of words."""
    words: list[str] = []
    ids = engine.encode_chat([("user", "")])
    while len(ids) < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
        ids = engine.encode_chat([("user", " ".join(words))])
    return ids


def schedule(prompts: list[list[int]], answers: list[int], n: int, rate: float, seed: int) -> list[Request]:
    """`n` requests with exponential gaps of mean 1/`rate` s (rate 0: all at once), mixed lengths."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(n):
        out.append(Request(at, rng.choice(prompts), rng.choice(answers)))
        at += rng.expovariate(rate) if rate > 0 else 0.0
    return out


# Replaying a schedule.


async def replay(call: Callable, requests: list[Request], swap: Callable | None = None) -> list[Result]:
    """Starts each request at its time; `swap`, if given, runs in a thread half-way through the schedule."""
    start = time.perf_counter()
    tasks, swap_task = [], None
    swap_at = requests[len(requests) // 2].at
    for request in requests:
        delay = start + request.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if swap is not None and swap_task is None and request.at >= swap_at:
            swap_task = asyncio.create_task(asyncio.to_thread(swap))
        tasks.append(asyncio.create_task(call(request)))
    results = await asyncio.gather(*tasks)
    if swap_task is not None:
        await swap_task
    return results


def engine_call(engine: PolicyEngine) -> Callable:
    async def call(request: Request) -> Result:
        arrival = time.perf_counter()
        first = None
        params = SamplingParams(request.max_new_tokens, temperature=0.0, top_p=1.0)
        async for event in engine.submit(request.prompt_ids, params):
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter()
            if isinstance(event, Finished):
                end = time.perf_counter()
                return Result(arrival, first or end, end, event.completion_tokens, event.model_version)
        raise RuntimeError("the stream ended without a Finished")

    return call


class _FirstToken(BaseStreamer):
    """Notes when `generate` produced the batch's first new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class GenerateBatcher:
    """Static batching over plain `model.generate`: a worker takes up to `max_batch_size` waiting requests
    and generates them together, greedy, for as many steps as the longest asks (or until all stop)."""

    def __init__(self, model, tokenizer, pad_id: int, max_batch_size: int, device: torch.device) -> None:
        self.model, self.pad_id, self.max_batch_size, self.device = model, pad_id, max_batch_size, device
        self.stop_ids = sorted(_stop_ids(model, tokenizer))
        self.waiting: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, daemon=True)

    async def call(self, request: Request) -> Result:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.waiting.put(
            (request, time.perf_counter(), lambda r: loop.call_soon_threadsafe(done.set_result, r))
        )
        return await done

    def _work(self) -> None:
        while (item := self.waiting.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch_size and not self.waiting.empty():
                batch.append(self.waiting.get())
            self._generate(batch)

    @torch.inference_mode()
    def _generate(self, batch: list) -> None:
        width = max(len(r.prompt_ids) for r, _, _ in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for i, (r, _, _) in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :], mask[i, width - len(r.prompt_ids) :] = (
                torch.tensor(r.prompt_ids),
                1,
            )
        streamer = _FirstToken()
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(r.max_new_tokens for r, _, _ in batch),
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids,
            streamer=streamer,
        )[:, width:].tolist()  # (B, new)
        end = time.perf_counter()
        for (request, arrival, reply), new in zip(batch, out, strict=True):
            reply(Result(arrival, streamer.first or end, end, self._useful(new, request.max_new_tokens)))

    def _useful(self, new: list[int], max_new_tokens: int) -> int:
        """Tokens this request asked for: up to its own stop or limit; the rest was computed for nothing."""
        for i, token in enumerate(new[:max_new_tokens]):
            if token in self.stop_ids:
                return i + 1
        return min(len(new), max_new_tokens)


# The three engines on one schedule.


@dataclass(frozen=True)
class Bench:
    """What every run shares: the model, its tokenizer and the settings."""

    model: object
    tokenizer: object
    device: str
    max_batch_size: int
    prompts: list[list[int]]  # prompt token ids, one per length to mix


async def run(
    bench: Bench, kind: str, requests: list[Request], swap_model=None, swapped_at: list | None = None
) -> list[Result]:
    """Replays `requests` on a fresh engine of `kind` (continuous, static or generate); with `swap_model`,
    swaps it in half-way and appends the time of the swap to `swapped_at`."""
    if kind == "generate":
        batcher = GenerateBatcher(
            bench.model,
            bench.tokenizer,
            _pad_id(bench.tokenizer),
            bench.max_batch_size,
            torch.device(bench.device),
        )
        batcher.thread.start()
        try:
            return await replay(batcher.call, requests)
        finally:
            batcher.waiting.put(None)
    cls = PolicyEngine if kind == "continuous" else StaticPolicyEngine
    engine = cls(
        bench.model,
        bench.tokenizer,
        "v1",
        device=bench.device,
        max_batch_size=bench.max_batch_size,
        max_queue=10**6,
    )
    engine.start()

    def swap() -> None:
        swapped_at.append(time.perf_counter())
        engine.swap(swap_model, "v2")

    try:
        return await replay(engine_call(engine), requests, None if swap_model is None else swap)
    finally:
        await asyncio.to_thread(engine.stop, 60)


def figures(rounds: list[list[Result]]) -> Figures:
    """Throughput over the rounds' summed spans; percentiles over all their requests."""
    results = [r for one in rounds for r in one]
    ttft = [r.first - r.arrival for r in results]
    e2e = [r.end - r.arrival for r in results]
    return Figures(
        sum(r.tokens for r in results) / sum(_span(one) for one in rounds),
        percentile(ttft, 50),
        percentile(ttft, 95),
        percentile(e2e, 50),
        percentile(e2e, 95),
    )


# Reporting.


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def print_table(rows: list[tuple[float, float, str, Figures]]) -> None:
    print("| load | req/s | engine | tokens/s | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for fraction, rate, kind, f in rows:
        print(
            f"| {fraction:.2f} | {rate:.1f} | {kind} | {f.tokens_per_s:.0f} | {ms(f.ttft_p50)} "
            f"| {ms(f.ttft_p95)} | {ms(f.e2e_p50)} | {ms(f.e2e_p95)} |"
        )


def print_goals(rows: list[tuple[float, float, str, Figures]]) -> None:
    """The issue's goals per load: p95 at most half the static batcher's, throughput at least generate's."""
    by = {(fraction, kind): f for fraction, _, kind, f in rows}
    for fraction in sorted({fraction for fraction, _, _, _ in rows}):
        c, s, g = (by[fraction, k] for k in ("continuous", "static", "generate"))
        print(
            f"load {fraction:.2f}: e2e p95 continuous/static = {c.e2e_p95 / s.e2e_p95:.2f} (goal <= 0.5), "
            f"throughput continuous/generate = {c.tokens_per_s / g.tokens_per_s:.2f} (goal >= 1)"
        )


async def swap_report(bench: Bench, args, rate: float) -> None:
    """The latency a swap adds to the requests in flight at it, for the continuous and the static engine: the
    same schedules with and without a swap, run in alternation so both see the machine alike."""
    other = copy.deepcopy(bench.model)  # already loaded: the load itself is the follower's (swap_latency.py)
    for kind in ("continuous", "static"):
        with_swap, without, versions = [], [], {"v1": 0, "v2": 0}
        for i in range(args.rounds):
            requests = schedule(bench.prompts, args.answer_tokens, args.requests, rate, args.seed + i)
            base, marks = await run(bench, kind, requests), []
            swapped = await run(bench, kind, requests, swap_model=other, swapped_at=marks)
            in_flight = [j for j, r in enumerate(swapped) if r.arrival <= marks[0] <= r.end]
            with_swap += [swapped[j].end - swapped[j].arrival for j in in_flight]
            without += [base[j].end - base[j].arrival for j in in_flight]
            for r in swapped:
                versions[r.version] += 1
        print(
            f"swap at {rate:.1f} req/s, {kind}: the {len(with_swap)} requests in flight at the swap took "
            f"e2e p50 {ms(percentile(with_swap, 50))} ms / p95 {ms(percentile(with_swap, 95))} ms, against "
            f"{ms(percentile(without, 50))} / {ms(percentile(without, 95))} ms without it; answers {versions}"
        )


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.torch_threads)
    model_dir = args.model_dir or write_tiny_model(Path(tempfile.mkdtemp(prefix="rlhf-engine-load-")), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_policy(model_dir, args.device)
    probe = PolicyEngine(model, tokenizer, "v1", device=args.device)  # encodes prompts, never started
    prompts = [prompt_of_length(probe, n) for n in args.prompt_tokens]
    bench = Bench(model, tokenizer, args.device, args.max_batch_size, prompts)
    burst = schedule(prompts, args.answer_tokens, args.requests, 0.0, args.seed)
    await run(bench, "continuous", burst[: args.max_batch_size])  # warm-up
    capacity = args.requests / _span(await run(bench, "continuous", burst))
    print(
        f"model {model_dir}, {args.device}, {args.torch_threads} torch thread(s), max_batch_size "
        f"{args.max_batch_size}, {args.rounds} rounds of {args.requests} requests per load, "
        f"prompt tokens {[len(p) for p in prompts]}, answer tokens {args.answer_tokens}; "
        f"capacity (continuous, all at once) {capacity:.1f} req/s"
    )
    rows = []
    for fraction in args.loads:
        rows += await compare(bench, args, fraction, fraction * capacity)
    print_table(rows)
    print_goals(rows)
    if args.swap:
        await swap_report(bench, args, args.swap_load * capacity)


async def compare(
    bench: Bench, args, fraction: float, rate: float
) -> list[tuple[float, float, str, Figures]]:
    """The three engines at one load, in alternation, a fresh seeded schedule per round."""
    rounds: dict[str, list[list[Result]]] = {kind: [] for kind in KINDS}
    for i in range(args.rounds):
        requests = schedule(bench.prompts, args.answer_tokens, args.requests, rate, args.seed + i)
        for kind in KINDS:
            rounds[kind].append(await run(bench, kind, requests))
    return [(fraction, rate, kind, figures(rounds[kind])) for kind in KINDS]


def _span(results: list[Result]) -> float:
    return max(r.end for r in results) - min(r.arrival for r in results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default="", help="Hugging Face model folder (default: the tiny preset)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per load, the engines in alternation")
    parser.add_argument("--loads", type=_floats, default=[0.25, 0.5, 0.75, 1.0], help="fractions of capacity")
    parser.add_argument("--prompt-tokens", type=_ints, default=[16, 48, 128], help="prompt lengths to mix")
    parser.add_argument("--answer-tokens", type=_ints, default=[8, 16, 32, 64], help="answer lengths to mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--swap", action="store_true", help="also measure the latency a hot swap adds")
    parser.add_argument("--swap-load", type=float, default=0.75, help="load fraction of the swap run")
    return parser.parse_args()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
