"""Acknowledged ratings per second through SubmitFeedback, and how long each waits for the broker's ack.

A real inference server runs in this process (port 0, tiny model, topics of its own) against a running
Kafka broker; concurrent gRPC clients, in worker processes of their own so they do not share the server's
interpreter lock, each send one rating after another for a fixed time. Every rating is real: a signed
response id, a user who has not rated it yet, acks=all on an idempotent producer.

    rlhf-online kafka start      # or use the test broker at 127.0.0.1:19192
    .venv/bin/python benchmarks/feedback_throughput.py --kafka-bootstrap 127.0.0.1:19192

Both ways of waiting for the ack run side by side: `thread` is the old one (`asyncio.to_thread` around a
blocking `send().get()`, so at most one rating per default-executor thread waits at a time), `callback` the
new one (the send future's callbacks resolve an asyncio future; no thread held). `--profile FILE` writes a
cProfile of the server's event loop thread during the last run (read it with `python -m pstats FILE`).
"""

import argparse
import asyncio
import contextlib
import cProfile
import multiprocessing
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import grpc
from bench_server import percentile, start_server

from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc

UP = chat_pb2.THUMBS_UP


class ThreadedAcks:
    """The old wait, for comparison: a default-executor thread blocks in `send().get()` per rating."""

    def __init__(self, events) -> None:
        self._events = events

    async def publish_acked_async(self, topic: str, key: bytes, value: bytes, timeout_s: float) -> None:
        await asyncio.to_thread(self._events.publish_acked, topic, key, value, timeout_s)

    def __getattr__(self, name: str):
        return getattr(self._events, name)


@dataclass
class Load:
    """What one worker process does: `clients` clients from `start` (monotonic clock) for `seconds`."""

    protocol: str  # grpc: SubmitFeedback; http: POST /feedback of the TGI front end
    port: int
    response_ids: list[str]
    user_prefix: str
    clients: int
    start: float
    warmup_s: float
    seconds: float


@dataclass
class Outcome:
    acked: int  # inside the measured window
    total: int  # over the whole run, warm-up included
    failed: int
    latencies: list[float]  # seconds, of the ratings acknowledged inside the measured window
    client_cpu_s: float = 0.0


def _ready(_: int) -> None:
    pass


def run_load(load: Load) -> Outcome:
    """Entry point of a worker process."""
    cpu = time.process_time()
    outcome = asyncio.run(_drive(load))
    outcome.client_cpu_s = time.process_time() - cpu
    return outcome


async def _drive(load: Load) -> Outcome:
    measure_from, end = load.start + load.warmup_s, load.start + load.warmup_s + load.seconds
    outcome = Outcome(0, 0, 0, [])

    async def client(i: int) -> None:
        async with _rater(load.protocol, load.port) as rate:
            await asyncio.sleep(max(0.0, load.start - time.monotonic()))
            for response_id in load.response_ids:
                began = time.monotonic()
                if began >= end:
                    return
                if not await rate(response_id, f"{load.user_prefix}-{i}"):
                    outcome.failed += 1
                    continue
                done = time.monotonic()
                outcome.total += 1
                if measure_from <= done <= end:
                    outcome.acked += 1
                    outcome.latencies.append(done - began)

    await asyncio.gather(*(client(i) for i in range(load.clients)))
    return outcome


@contextlib.asynccontextmanager
async def _rater(protocol: str, port: int):
    """One client's connection, as `await rate(response_id, user_id) -> acknowledged`."""
    if protocol == "grpc":
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            await channel.channel_ready()

            async def rate(response_id: str, user_id: str) -> bool:
                request = chat_pb2.FeedbackRequest(response_id=response_id, rating=UP, user_id=user_id)
                try:
                    await stub.SubmitFeedback(request, timeout=30)
                    return True
                except grpc.aio.AioRpcError:
                    return False

            yield rate
    else:
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection, like the gRPC channel
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as session:

            async def rate(response_id: str, user_id: str) -> bool:
                body = {"response_id": response_id, "rating": "THUMBS_UP", "user_id": user_id}
                async with session.post("/feedback", json=body) as response:
                    await response.read()
                    return response.status == 200

            yield rate


def measure(pool, port: int, ids: list[str], label: str, clients: int, args) -> tuple[Outcome, float]:
    """Runs `clients` clients spread over the pool's processes; returns the merged outcome and window."""
    per_proc = [clients // args.procs + (1 if p < clients % args.procs else 0) for p in range(args.procs)]
    start = time.monotonic() + 2.0  # every process connected before anyone starts
    loads = [
        Load(args.protocol, port, ids, f"{label}-{clients}-{p}", n, start, args.warmup, args.seconds)
        for p, n in enumerate(per_proc)
        if n
    ]
    outcomes = pool.map(run_load, loads)
    merged = Outcome(
        sum(o.acked for o in outcomes),
        sum(o.total for o in outcomes),
        sum(o.failed for o in outcomes),
        [x for o in outcomes for x in o.latencies],
        sum(o.client_cpu_s for o in outcomes),
    )
    return merged, args.seconds


def thread_cpu() -> Counter:
    """CPU seconds so far of each thread of this process, by Python thread name (others by OS name)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    cpu: Counter = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu[names.get(int(tid), f"native:{comm}")] += (int(fields[11]) + int(fields[12])) / tick
    return cpu


def print_thread_cpu(before: Counter, after: Counter, ratings: int) -> None:
    print(f"server CPU by thread in the last run (us per rating, {ratings} ratings):")
    spent = after - before
    for name, seconds in spent.most_common(8):
        print(f"  {name:<32} {seconds / max(1, ratings) * 1e6:>6.0f}")


async def main(args: argparse.Namespace) -> None:
    running, _, _ = await start_server(
        args.kafka_bootstrap,
        torch_threads=1,
        partitions=args.partitions,
        feedback_burst=10_000_000,
        feedback_rate_per_s=10_000_000,
        tgi_port=0 if args.protocol == "http" else -1,
    )
    port = running.tgi_port if args.protocol == "http" else running.port
    # Signed ids straight from the server's signer: the ratings are real, the answers need not be.
    ids = [running.chat.signer.issue(running.engine.version) for _ in range(args.ids)]
    kafka_events = running.chat.events
    profiler = cProfile.Profile() if args.profile else None
    print(
        f"{args.protocol} ratings, acks=all idempotent producer, {args.partitions} partitions, {args.procs} "
        f"client process(es), {args.seconds:.0f}s per run after {args.warmup:.0f}s warm-up"
    )
    print(f"{'wait':<9} {'clients':>7} {'ratings/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} "
          f"{'server CPU us/rating':>21} {'client CPU us/rating':>21}")  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
        await asyncio.to_thread(pool.map, _ready, range(args.procs))  # workers imported and waiting
        runs = [(path, c) for path in args.paths for c in args.clients]
        for k, (path, clients) in enumerate(runs):
            running.chat.events = ThreadedAcks(kafka_events) if path == "thread" else kafka_events
            last = profiler is not None and k == len(runs) - 1
            if last:
                profiler.enable()
            threads_before = thread_cpu()
            outcome, seconds = await asyncio.to_thread(measure, pool, port, ids, path, clients, args)
            threads_after = thread_cpu()
            if last:
                profiler.disable()
            print_row(path, clients, outcome, seconds, sum((threads_after - threads_before).values()))
    print_thread_cpu(threads_before, threads_after, outcome.total + outcome.failed)
    running.chat.events = kafka_events
    if profiler:
        profiler.dump_stats(args.profile)
        print(f"profile of the last run's event loop thread: {args.profile}")
    await running.stop(grace_s=1)


def print_row(path: str, clients: int, outcome: Outcome, seconds: float, server_cpu_s: float) -> None:
    lat = outcome.latencies or [float("nan")]
    ratings = max(1, outcome.total + outcome.failed)
    print(
        f"{path:<9} {clients:>7} {outcome.acked / seconds:>10.0f} "
        f"{percentile(lat, 50) * 1000:>8.1f} {percentile(lat, 99) * 1000:>8.1f} {outcome.failed:>7} "
        f"{server_cpu_s / ratings * 1e6:>21.0f} {outcome.client_cpu_s / ratings * 1e6:>21.0f}"
    )


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka-bootstrap", default="127.0.0.1:19092")
    parser.add_argument(
        "--protocol", choices=["grpc", "http"], default="grpc", help="SubmitFeedback or POST /feedback"
    )
    parser.add_argument("--paths", type=_csv(str), default=["thread", "callback"], help="thread,callback")
    parser.add_argument("--clients", type=_csv(int), default=[16, 64], help="concurrent clients per run")
    parser.add_argument("--procs", type=int, default=1, help="worker processes the clients run in")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time at the start of a run")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the feedback topic")
    parser.add_argument("--ids", type=int, default=20_000, help="response ids each client may rate")
    parser.add_argument("--profile", default="", help="write a cProfile of the last run here")
    asyncio.run(main(parser.parse_args()))
