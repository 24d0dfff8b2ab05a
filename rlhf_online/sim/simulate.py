"""Simulated users: chat with the served policy, judge each answer by a hidden preference, rate it.

    rlhf-online simulate --target 127.0.0.1:50051 --duration-s 60 --concurrency 4 --judge lowercase
    rlhf-online simulate --judge mypackage.judges:likes_cats --rater-noise 0.2 --rated-share 0.5

Each request comes from one of `--users` simulated users (a user id each), asks a prompt from the prompt file
through Chat or ChatStream, and is rated with probability `--rated-share`: the judge gives P(up), the rater
flips their verdict with probability `--rater-noise`, and SubmitFeedback sends the thumb. Every request is
recorded (answer, model version, rating, whether SubmitFeedback acknowledged it); at the end a summary gives
the thumbs-up rate per model version.
"""

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import aiohttp
import grpc

from rlhf_online.config import parse_config
from rlhf_online.contract import now_ms
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc
from rlhf_online.sim.config import SimulateConfig
from rlhf_online.sim.judges import Judge, load_judge, noisy, thumbs_up_probability
from rlhf_online.sim.tgi_chat import TgiChat, TgiError

log = logging.getLogger(__name__)

# SubmitFeedback is retried only where the server says nothing was published: a retry after a lost answer
# could publish a rating twice.
_FEEDBACK_RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
_FEEDBACK_ATTEMPTS = 4
_CHAT_BACKOFF_S = 0.2


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts of a file (empty `path`: the built-in one): one a line, `#` comments, `\\n` escapes."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("rlhf_online").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip().replace("\\n", "\n") for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path or 'rlhf_online/data/prompts.txt'} has no prompts")
    return prompts


@dataclass
class Outcome:
    """What happened to one simulated request."""

    index: int
    user_id: str
    prompt: str
    stream: bool
    started_ms: int
    latency_s: float = 0.0
    response_id: str = ""
    text: str = ""
    model_version: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0
    p_up: float | None = None  # the hidden judge's P(thumbs up), before rater noise
    rating: str = ""  # "up", "down", or "" when the user did not rate
    acknowledged: bool = False  # SubmitFeedback answered OK
    event_id: str = ""
    error: str = ""  # "<rpc> <status code>: <details>" of the call that failed


@dataclass
class VersionStats:
    """Counts for one model version."""

    served: int = 0
    rated: int = 0  # ratings acknowledged by SubmitFeedback
    up: int = 0  # of which thumbs up
    judge_sum: float = 0.0  # sum of the judge's P(up) over served answers

    @property
    def up_rate(self) -> float | None:
        return self.up / self.rated if self.rated else None

    @property
    def judge_mean(self) -> float | None:
        return self.judge_sum / self.served if self.served else None


@dataclass
class Summary:
    """Running totals of a simulation, per model version."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "<rpc> <status code>" -> count
    feedback_refused: int = 0
    versions: dict[str, VersionStats] = field(default_factory=dict)
    started_s: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.requests += 1
        self.elapsed_s = time.monotonic() - self.started_s
        if outcome.error:
            key = outcome.error.split(":", 1)[0]
            self.errors[key] = self.errors.get(key, 0) + 1
        if not outcome.model_version:
            return
        stats = self.versions.setdefault(outcome.model_version, VersionStats())
        stats.served += 1
        stats.judge_sum += outcome.p_up or 0.0
        if outcome.acknowledged:
            stats.rated += 1
            stats.up += outcome.rating == "up"
        elif outcome.rating:
            self.feedback_refused += 1

    @property
    def rated(self) -> int:
        return sum(s.rated for s in self.versions.values())

    def to_json(self) -> dict:
        return {
            "requests": self.requests,
            "elapsed_s": round(self.elapsed_s, 3),
            "errors": self.errors,
            "feedback_refused": self.feedback_refused,
            "versions": {
                v: {
                    "served": s.served,
                    "rated": s.rated,
                    "up": s.up,
                    "up_rate": s.up_rate,
                    "judge_mean": s.judge_mean,
                }
                for v, s in sorted(self.versions.items())
            },
        }

    def table(self) -> str:
        """A plain-text table, one row per model version, oldest first."""
        lines = [f"{'version':<12} {'served':>7} {'rated':>7} {'up':>6} {'up rate':>8} {'judge':>6}"]
        for version, s in sorted(self.versions.items()):
            rate = f"{s.up_rate:.1%}" if s.up_rate is not None else "-"
            judge = f"{s.judge_mean:.2f}" if s.judge_mean is not None else "-"
            lines.append(f"{version:<12} {s.served:>7} {s.rated:>7} {s.up:>6} {rate:>8} {judge:>6}")
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        lines.append(
            f"{self.requests} requests in {self.elapsed_s:.1f}s; errors: {errors}; "
            f"ratings refused: {self.feedback_refused}"
        )
        return "\n".join(lines)


class Simulator:
    """Runs `concurrency` workers sending requests on behalf of `users` simulated users until told to stop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        prompts: Sequence[str],
        judge: Judge,
        config: SimulateConfig,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
        tgi: TgiChat | None = None,
    ) -> None:
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.tgi = tgi  # chat over TGI's HTTP API instead of gRPC
        self.prompts, self.judge, self.config = list(prompts), judge, config
        self.on_outcome = on_outcome
        self.summary = Summary()
        self.user_ids = [f"sim-{config.seed}-{i:04d}" for i in range(config.users)]
        self._issued = 0
        self._next_slot = 0.0

    async def run(self, stop: asyncio.Event | None = None) -> Summary:
        """Sends requests until the duration or request count is reached or `stop` is set; returns totals."""
        stop = stop or asyncio.Event()
        self.summary = Summary()
        self._next_slot = time.monotonic()
        deadline = time.monotonic() + self.config.duration_s if self.config.duration_s else None
        workers = [
            asyncio.create_task(self._worker(w, stop, deadline)) for w in range(self.config.concurrency)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.summary.elapsed_s = time.monotonic() - self.summary.started_s
        return self.summary

    async def _worker(self, worker: int, stop: asyncio.Event, deadline: float | None) -> None:
        rng = random.Random(self.config.seed * 1_000_003 + worker)
        while not stop.is_set():
            if not await self._pace(stop, deadline):
                return
            if self.config.max_requests and self._issued >= self.config.max_requests:
                return
            index = self._issued
            self._issued += 1
            outcome = await self.one_request(index, rng)
            self.summary.add(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            if outcome.error and not outcome.model_version:
                await asyncio.sleep(_CHAT_BACKOFF_S * (1 + rng.random()))

    async def _pace(self, stop: asyncio.Event, deadline: float | None) -> bool:
        """Waits for this worker's next send slot (the shared rate); False when the run is over."""
        now = time.monotonic()
        at = now
        if self.config.rate:
            at = max(now, self._next_slot)
            self._next_slot = at + 1.0 / self.config.rate
        if deadline is not None and at >= deadline:
            return False
        if at > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), at - now)
        return not stop.is_set()

    async def one_request(self, index: int, rng: random.Random) -> Outcome:
        """One user asks one prompt, judges the answer and (maybe) rates it."""
        user_id = rng.choice(self.user_ids)
        prompt = rng.choice(self.prompts)
        stream = rng.random() < self.config.stream_share
        rate_it = rng.random() < self.config.rated_share
        outcome = Outcome(index=index, user_id=user_id, prompt=prompt, stream=stream, started_ms=now_ms())
        request = chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role="user", content=prompt)], user_id=user_id, params=self._params()
        )
        start = time.monotonic()
        try:
            if self.tgi is not None:
                await self._chat_tgi(request, outcome)
            elif stream:
                await self._chat_stream(request, outcome)
            else:
                await self._chat(request, outcome)
        except (TgiError, aiohttp.ClientError, TimeoutError) as e:
            outcome.error = f"TGI {'generate_stream' if stream else 'generate'}: {e}"
            return outcome
        except grpc.aio.AioRpcError as e:
            outcome.error = f"{'ChatStream' if stream else 'Chat'} {e.code().name}: {e.details()}"
            log.debug("request %d failed: %s", index, outcome.error)
            return outcome
        finally:
            outcome.latency_s = time.monotonic() - start
        if outcome.error:
            return outcome
        outcome.p_up = thumbs_up_probability(self.judge, prompt, outcome.text)
        if rate_it:
            up = rng.random() < noisy(outcome.p_up, self.config.rater_noise)
            outcome.rating = "up" if up else "down"
            await self._feedback(outcome, rng)
        return outcome

    def _params(self) -> chat_pb2.GenerationParams:
        params = chat_pb2.GenerationParams(max_new_tokens=self.config.max_new_tokens)
        if self.config.temperature >= 0:
            params.temperature = self.config.temperature
        return params

    async def _chat(self, request: chat_pb2.ChatRequest, outcome: Outcome) -> None:
        response = await self.stub.Chat(request, timeout=self.config.chat_deadline_s)
        outcome.response_id, outcome.text = response.response_id, response.text
        outcome.model_version, outcome.finish_reason = response.model_version, response.finish_reason
        outcome.completion_tokens = response.usage.completion_tokens

    async def _chat_tgi(self, request: chat_pb2.ChatRequest, outcome: Outcome) -> None:
        params = {"max_new_tokens": request.params.max_new_tokens or None}
        if request.params.HasField("temperature"):
            t = request.params.temperature
            params.update({"do_sample": True, "temperature": t} if t > 0 else {"do_sample": False})
        else:
            params["do_sample"] = True  # the gRPC service's default: sampling at temperature 1
        got = await self.tgi.answer(outcome.prompt, outcome.user_id, params, outcome.stream)
        outcome.text, outcome.response_id = got["text"], got["response_id"]
        outcome.model_version, outcome.finish_reason = got["model_version"], got["finish_reason"]
        outcome.completion_tokens = got["completion_tokens"]

    async def _chat_stream(self, request: chat_pb2.ChatRequest, outcome: Outcome) -> None:
        pieces = []
        async for chunk in self.stub.ChatStream(request, timeout=self.config.chat_deadline_s):
            pieces.append(chunk.text)
            if chunk.response_id:
                outcome.response_id, outcome.model_version = chunk.response_id, chunk.model_version
                outcome.finish_reason = chunk.finish_reason
                outcome.completion_tokens = chunk.usage.completion_tokens
        outcome.text = "".join(pieces)
        if not outcome.response_id:
            outcome.model_version = ""
            outcome.error = (
                "ChatStream INCOMPLETE: the stream ended without a last chunk carrying response_id"
            )
            log.warning("request %d: %s", outcome.index, outcome.error)

    async def _feedback(self, outcome: Outcome, rng: random.Random) -> None:
        if not outcome.response_id:
            return
        rating = chat_pb2.THUMBS_UP if outcome.rating == "up" else chat_pb2.THUMBS_DOWN
        request = chat_pb2.FeedbackRequest(
            response_id=outcome.response_id, rating=rating, user_id=outcome.user_id
        )
        for attempt in range(_FEEDBACK_ATTEMPTS):
            try:
                response = await self.stub.SubmitFeedback(request, timeout=self.config.feedback_deadline_s)
            except grpc.aio.AioRpcError as e:
                outcome.error = f"SubmitFeedback {e.code().name}: {e.details()}"
                if e.code() not in _FEEDBACK_RETRY_CODES or attempt == _FEEDBACK_ATTEMPTS - 1:
                    log.debug("rating of request %d not acknowledged: %s", outcome.index, outcome.error)
                    return
                await asyncio.sleep(0.25 * 2**attempt * (1 + rng.random()))
                continue
            outcome.acknowledged, outcome.event_id, outcome.error = True, response.event_id, ""
            return


async def simulate(
    config: SimulateConfig,
    *,
    stop: asyncio.Event | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Summary:
    """Connects to `config.target`, runs the simulated users, writes outcomes/summary files if asked."""
    judge = load_judge(config.judge, config.judge_args)
    prompts = load_prompts(config.prompts_file)
    sink = open(config.outcomes_path, "a", encoding="utf-8") if config.outcomes_path else None  # noqa: SIM115

    def record(outcome: Outcome) -> None:
        if sink is not None:
            sink.write(json.dumps(asdict(outcome)) + "\n")
        if on_outcome is not None:
            on_outcome(outcome)

    try:
        tgi = TgiChat(config.tgi_target, config.tokenizer_dir) if config.protocol == "tgi" else None
        try:
            async with grpc.aio.insecure_channel(config.target) as channel:
                simulator = Simulator(channel, prompts, judge, config, on_outcome=record, tgi=tgi)
                summary = await simulator.run(stop)
        finally:
            if tgi is not None:
                await tgi.close()
    finally:
        if sink is not None:
            sink.close()
    if config.summary_path:
        Path(config.summary_path).write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(SimulateConfig, argv, env, prog="rlhf-online simulate")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        load_judge(config.judge, config.judge_args)
    except ValueError as e:
        print(f"rlhf-online simulate: {e}", file=sys.stderr)
        return 2

    async def run() -> Summary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "simulating users against %s with judge %s (noise %.2f, rated share %.2f)",
            config.target,
            config.judge,
            config.rater_noise,
            config.rated_share,
        )
        return await simulate(config, stop=stop)

    summary = asyncio.run(run())
    print(summary.table())
    return 0 if summary.rated else 1
