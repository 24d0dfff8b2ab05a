"""Load figures for the inference service: Chat latency, SubmitFeedback throughput, batch sizes.

Runs a real server in-process (port 0, tiny model, CPU) against a running Kafka broker and drives it with
real gRPC clients:

    rlhf-online kafka start
    .venv/bin/python benchmarks/inference_load.py --kafka-bootstrap 127.0.0.1:19092

It prints Chat latency p50/p95 alone and under concurrency, acknowledged SubmitFeedback RPCs per second from
concurrent clients, and the largest batch the engine ran. `--protocol tgi` asks the same questions over the
TGI HTTP API (POST /generate, keep-alive connections) instead of gRPC Chat; ratings go over gRPC either way.
benchmarks/feedback_throughput.py measures ratings alone, in more detail.
"""

import argparse
import asyncio
import time
from functools import partial

import aiohttp
import grpc
from bench_server import percentile, start_server

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc


async def chat_latencies(
    stub, clients: int, per_client: int, max_new_tokens: int
) -> tuple[list[float], list[str]]:
    latencies, ids = [], []

    async def client(i: int) -> None:
        for j in range(per_client):
            request = chat_pb2.ChatRequest(
                messages=[chat_pb2.Message(role="user", content=f"question {i}.{j}: how are you?")],
                params=chat_pb2.GenerationParams(max_new_tokens=max_new_tokens, seed=i * 1000 + j),
                user_id=f"user{i}",
            )
            start = time.perf_counter()
            reply = await stub.Chat(request, timeout=120)
            latencies.append(time.perf_counter() - start)
            ids.append(reply.response_id)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, ids


async def tgi_latencies(
    url: str, tokenizer, clients: int, per_client: int, max_new_tokens: int
) -> tuple[list[float], list[str]]:
    """The same over the TGI HTTP API: the same prompts, rendered with the chat template as a TGI client of
    a chat model sends them; sampled with a seed; the response id from `x-response-id`."""
    latencies, ids = [], []

    async def client(i: int) -> None:
        async with aiohttp.ClientSession(url, headers={"x-user-id": f"user{i}"}) as session:
            for j in range(per_client):
                body = {
                    "inputs": render_prompt(tokenizer, [("user", f"question {i}.{j}: how are you?")]),
                    "parameters": {"max_new_tokens": max_new_tokens, "do_sample": True, "seed": i * 1000 + j},
                }
                start = time.perf_counter()
                async with session.post("/generate", json=body) as response:
                    await response.read()
                    response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                ids.append(response.headers["x-response-id"])

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, ids


async def feedback_rate(stub, response_ids: list[str], raters: int, clients: int) -> tuple[int, float]:
    # One vote per user and answer, as the service enforces.
    queue = [(rid, f"rater{k}") for k in range(raters) for rid in response_ids]
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        while queue:
            rid, user = queue.pop()
            request = chat_pb2.FeedbackRequest(response_id=rid, rating=chat_pb2.THUMBS_UP, user_id=user)
            await stub.SubmitFeedback(request, timeout=30)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done, time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    running, _, _ = await start_server(
        args.kafka_bootstrap,
        torch_threads=args.torch_threads,
        partitions=4,
        max_batch_size=args.max_batch_size,
        feedback_burst=100_000,
        feedback_rate_per_s=100_000,
        tgi_port=0 if args.protocol == "tgi" else -1,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        if args.protocol == "tgi":
            latencies = partial(
                tgi_latencies, f"http://127.0.0.1:{running.tgi_port}", running.engine.tokenizer
            )
        else:
            latencies = partial(chat_latencies, stub)
        await latencies(1, 3, args.max_new_tokens)  # warm-up
        alone, _ = await latencies(1, args.requests, args.max_new_tokens)
        loaded, ids = await latencies(args.clients, args.requests, args.max_new_tokens)
        count, seconds = await feedback_rate(stub, ids, 4, args.feedback_clients)
    print(
        f"tiny model, CPU, {args.protocol}, max_new_tokens={args.max_new_tokens}, "
        f"max_batch_size={args.max_batch_size}"
    )
    print(
        f"Chat alone:         p50 {percentile(alone, 50) * 1000:.0f} ms, "
        f"p95 {percentile(alone, 95) * 1000:.0f} ms ({len(alone)} requests)"
    )
    print(
        f"Chat {args.clients} clients:  p50 {percentile(loaded, 50) * 1000:.0f} ms, "
        f"p95 {percentile(loaded, 95) * 1000:.0f} ms ({len(loaded)} requests)"
    )
    print(
        f"SubmitFeedback:     {count / seconds:.0f} acknowledged RPCs/s ({count} RPCs, "
        f"{args.feedback_clients} clients)"
    )
    print(f"largest batch seen: {running.engine.largest_batch_seen}")
    await running.stop(grace_s=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka-bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--requests", type=int, default=20, help="Chat requests per client")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--feedback-clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--protocol", choices=["grpc", "tgi"], default="grpc", help="how Chat is asked")
    asyncio.run(main(parser.parse_args()))
