"""The whole loop on this machine, live in the terminal: `make demo` or `rlhf-online demo`.

    rlhf-online demo                                   # tiny model on CPU, about 8 minutes
    rlhf-online demo --duration-s 120                  # shorter
    rlhf-online demo --model-dir ~/models/my-llm --device cuda

Steps:
1. a run folder `runs/<timestamp>/` (logs, model registry, simulator outcomes, report) and a topic prefix of
   its own, so runs never mix;
2. the local Kafka broker (`rlhf-online kafka start`; reused when it already runs);
3. the three services as child processes (`serve-inference`, `serve-reward`, `serve-trainer`), each on free
   ports, waiting until their gRPC health says SERVING; the first policy version is the base model;
4. the simulated users (`rlhf-online simulate`, in this process), in three phases: a baseline of
   `--baseline-answers` answers of the base model (the trainer starts after it), `--duration-s` of learning,
   and a final evaluation of `--final-answers` answers of the last version (the trainer stopped), so the first
   and the last version's thumbs-up rates rest on fixed samples. The terminal shows answers served, ratings,
   thumbs-up rate per model version, the reward model's held-out accuracy, PPO rounds and gate decisions, and
   swaps;
5. at the end or on Ctrl-C: the users stop, the services get SIGTERM (SIGKILL after a timeout), the report is
   written from the topics, a broker the demo started is stopped, and the report's path is printed.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online.config import parse_config
from rlhf_online.engine.tiny_model import is_tiny_preset
from rlhf_online.registry import Registry
from rlhf_online.sim import report
from rlhf_online.sim.config import DemoConfig, SimulateConfig
from rlhf_online.sim.simulate import Outcome, Summary, simulate
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".rlhf/models/tiny")
PARTITIONS = 2
CHAT_SERVICE = "rlhf.v1.ChatService"


class DemoError(RuntimeError):
    """The demo could not run; the message says which part failed and where its log is."""


def cli(*args: str) -> list[str]:
    """The command line of `rlhf-online ARGS` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "rlhf_online.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- services


@dataclass
class Service:
    """One child process: a service of the loop, with its ports and log file."""

    name: str
    command: list[str]
    grpc_port: int
    metrics_port: int
    health_service: str  # the name whose health means "ready" ("" = the whole server)
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches the demo only, which stops things in order.
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


# Settings the demo gives each service on top of their defaults; `--inference-args` etc. override them (the
# last flag wins).
DEMO_FLAGS: dict[str, dict[str, str]] = {"inference": {"--replica-id": "demo-0"}, "reward": {}, "trainer": {}}

# With the tiny model (the default), the reward model is sized so that the loop learns within a few minutes
# on two CPU cores: the tiny model's embeddings, final norm and head, no transformer block (a bag-of-tokens
# scorer, which learns the demo's character-class preference from a few hundred ratings where all 4 blocks
# need over a thousand); it reads the answer only (the last 40 tokens: 32 of answer, the end of the chat
# template) and takes 4 steps per 32 ratings. A real model directory keeps the reward service's defaults.
TINY_MODEL_FLAGS: dict[str, dict[str, str]] = {
    "reward": {
        "--backbone-layers": "0",
        "--max-length": "40",
        "--trainable-layers": "-1",
        "--learning-rate": "1e-3",
        "--steps-per-update": "4",
        "--checkpoint-every-updates": "4",
    },
}


def _flags(values: Mapping[str, str]) -> list[str]:
    return [word for flag, value in values.items() for word in (flag, value)]


def service_commands(
    config: DemoConfig, *, bootstrap: str, prefix: str, registry: Path, model_dir: Path, run_dir: Path
) -> list[Service]:
    """The three services of the loop, on free ports, with the demo's settings plus the user's extra flags."""
    common = {
        "--kafka-bootstrap": bootstrap,
        "--topic-prefix": prefix,
        "--registry-dir": str(registry),
        "--base-model-dir": str(model_dir),
        "--device": config.device,
        "--log-level": config.log_level,
    }
    if config.torch_threads:
        common["--torch-threads"] = str(config.torch_threads)
    tiny = is_tiny_preset(model_dir)
    services = []
    for name in ("inference", "reward", "trainer"):
        grpc_port, metrics_port = free_port(), free_port()
        flags = {
            **common,
            "--grpc-port": str(grpc_port),
            "--metrics-port": str(metrics_port),
            **DEMO_FLAGS[name],
            **(TINY_MODEL_FLAGS.get(name, {}) if tiny else {}),
        }
        if name == "inference":
            flags["--signing-key"] = secrets.token_hex(32)
        else:
            flags["--seed"] = str(config.seed)
        command = cli(f"serve-{name}", *_flags(flags), *shlex.split(getattr(config, f"{name}_args")))
        health_name = CHAT_SERVICE if name == "inference" else ""
        log_path = run_dir / "logs" / f"{name}.log"
        services.append(Service(name, command, grpc_port, metrics_port, health_name, log_path))
    return services


async def wait_serving(service: Service, deadline: float, stop: asyncio.Event) -> None:
    """Polls the service's gRPC health until SERVING; raises DemoError if it exits or the deadline passes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            code = service.exited()
            if code is not None:
                raise DemoError(
                    f"{service.name} exited with code {code} while starting; the end of "
                    f"{service.log_path}:\n{service.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{service.name} was not SERVING in time; the end of {service.log_path}:\n"
                    f"{service.log_tail()}"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                request = health_pb2.HealthCheckRequest(service=service.health_service)
                reply = await stub.Check(request, timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def scrape(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """A Prometheus endpoint's samples as {'name{label="v",...}': value}; {} when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


class ModelEventFollower(threading.Thread):
    """Reads the models topic in the background, so the display shows published versions and their figures."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="model-events", daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.events: list[report.ModelChange] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        from kafka import TopicPartition

        from rlhf_online.broker.clients import make_consumer
        from rlhf_online.proto.rlhf.v1 import events_pb2

        consumer = make_consumer(self.bootstrap, group_id=None, client_id="rlhf-demo-display")
        try:
            consumer.assign(
                [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or [0]]
            )
            while not self._stop_event.is_set():
                for batch in consumer.poll(timeout_ms=500).values():
                    messages = []
                    for record in batch:
                        with contextlib.suppress(Exception):
                            messages.append(events_pb2.ModelEvent.FromString(record.value or b""))
                    with self._lock:
                        self.events += report.from_protos([], [], messages).models
        except Exception as e:  # the display is a nicety: never let it take the demo down
            log.warning("stopped following %s: %s", self.topic, e)
        finally:
            consumer.close()

    def snapshot(self) -> list[report.ModelChange]:
        with self._lock:
            return list(self.events)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """What the terminal shows: the simulator's counters, the services' metrics, the published versions."""

    duration_s: float
    judge: str
    phase: str = "learning"  # or "baseline" / "final evaluation" (see --baseline-answers, --final-answers)
    started: float = field(default_factory=time.monotonic)
    summary: Summary = field(default_factory=Summary)
    recent: deque = field(default_factory=lambda: deque(maxlen=100))  # last ratings, True = up
    serving: str = ""
    rounds: list[report.Round] = field(default_factory=list)
    round_counts: dict[str, float] = field(default_factory=dict)
    trainer: dict[str, float] = field(default_factory=dict)
    inference: dict[str, float] = field(default_factory=dict)
    models: list[report.ModelChange] = field(default_factory=list)

    def on_outcome(self, outcome: Outcome) -> None:
        self.summary.add(outcome)
        if outcome.model_version:
            self.serving = outcome.model_version
        if outcome.acknowledged:
            self.recent.append(outcome.rating == "up")

    def update_trainer(self, samples: dict[str, float]) -> list[report.Round]:
        """Takes the trainer's metrics; returns the rounds that finished since the last call."""
        if not samples:
            return []
        self.trainer = samples
        new = []
        for outcome in ("published", "rejected", "failed", "abandoned"):
            count = samples.get(f'rlhf_trainer_rounds_total{{outcome="{outcome}"}}', 0.0)
            for _ in range(int(count - self.round_counts.get(outcome, 0.0))):
                scored = outcome in ("published", "rejected")
                new.append(
                    report.Round(
                        len(self.rounds) + len(new) + 1,
                        int(time.time() * 1000),
                        outcome,
                        samples.get("rlhf_trainer_reward_mean") if scored else None,
                        samples.get("rlhf_trainer_kl_nats") if scored else None,
                    )
                )
            self.round_counts[outcome] = count
        self.rounds += new
        return new

    def lines(self) -> list[str]:
        elapsed = time.monotonic() - self.started
        s = self.summary
        errors = sum(s.errors.values())
        recent = f"{sum(self.recent) / len(self.recent):.0%}" if self.recent else "-"
        out = [
            f"rlhf-online demo  {_clock(elapsed)} / {_clock(self.duration_s)}   judge: {self.judge}   "
            f"phase: {self.phase}",
            f"answers served {s.requests - errors:>6}   ratings {s.rated:>6}   errors {errors:>4}   "
            f"thumbs up over the last {len(self.recent)} ratings: {recent}",
            f"  {'version':<10}{'served':>8}{'rated':>8}{'up rate':>9}",
        ]
        for version, v in sorted(s.versions.items())[-8:]:
            mark = "  <- serving" if version == self.serving else ""
            rate = f"{v.up_rate:.1%}" if v.up_rate is not None else "-"
            out.append(f"  {version:<10}{v.served:>8}{v.rated:>8}{rate:>9}{mark}")
        out.append(self._reward_line())
        out.append(self._rounds_line())
        swaps = self.inference.get("rlhf_inference_swaps_total")
        swaps = int(swaps) if swaps is not None else max(len(s.versions) - 1, 0)
        published = sum(m.kind == "policy" and m.action == "published" for m in self.models)
        out.append(f"policy versions published {published}   swaps in serving {swaps}")
        return out

    def _reward_line(self) -> str:
        rewards = [m for m in self.models if m.kind == "reward" and m.action == "published"]
        if not rewards:
            return "reward model: no checkpoint yet"
        last = rewards[-1]
        accuracy = report.first_metric(last.metrics, report.REWARD_ACCURACY_KEYS)
        seen = report.first_metric(last.metrics, report.REWARD_SEEN_KEYS)
        acc = f"{accuracy:.1%}" if accuracy is not None else "-"
        seen_text = f" after {int(seen)} ratings" if seen is not None else ""
        return (
            f"reward model: {last.version}, held-out accuracy {acc}{seen_text} ({len(rewards)} checkpoints)"
        )

    def _rounds_line(self) -> str:
        if not self.rounds:
            waiting = self.trainer.get("rlhf_trainer_new_ratings")
            return "PPO: no round yet" + (f" ({int(waiting)} new ratings)" if waiting is not None else "")
        counts = {o: sum(r.outcome == o for r in self.rounds) for o in ("published", "rejected")}
        last = self.rounds[-1]
        figures = f"reward {last.reward_mean:.3f}, KL {last.kl:.2f}" if last.reward_mean is not None else ""
        return (
            f"PPO rounds {len(self.rounds)} (gate passed {counts['published']}, rejected "
            f"{counts['rejected']}); last: {last.outcome} {figures}"
        )


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


class Display:
    """Redraws the progress block in place on a terminal; elsewhere prints it every `every_s` seconds."""

    def __init__(self, out: TextIO, every_s: float = 15.0) -> None:
        self.out, self.every_s = out, every_s
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._drawn = 0
        self._last = -math.inf

    def show(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            width = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
            self.out.write("\n".join(line[:width] for line in lines) + "\n")
            self._drawn = len(lines)
        elif force or time.monotonic() - self._last >= self.every_s:
            self.out.write("\n".join(lines) + "\n\n")
            self._last = time.monotonic()
        self.out.flush()

    def say(self, message: str) -> None:
        """A line of its own above the live block."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(message + "\n")
        self.out.flush()


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class DemoResult:
    """Where a finished demo left its things, and its closing figures."""

    run_dir: Path
    report_path: Path | None
    outcomes_path: Path
    bootstrap: str
    topics: Topics
    summary: Summary
    verdict: dict = field(default_factory=dict)
    wall_time_s: float = 0.0


class Demo:
    """Starts the pieces, runs the users, shows progress, stops everything and writes the report."""

    def __init__(
        self, config: DemoConfig, *, out: TextIO = sys.stdout, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(config.run_dir or f"runs/{stamp}").resolve()
        self.topics = Topics(config.topic_prefix or f"demo-{stamp}-{secrets.token_hex(2)}")
        self.display = Display(out)
        self.env = dict(os.environ if env is None else env)
        self.services: list[Service] = []
        self.bootstrap = config.kafka_bootstrap
        self.started_broker = False
        self.follower: ModelEventFollower | None = None
        self.progress = Progress(config.duration_s, config.judge)
        self._phases_run = 0
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()  # a second Ctrl-C: kill instead of waiting

    def interrupt(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()

    async def run(self) -> DemoResult:
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        outcomes = self.run_dir / "outcomes.jsonl"
        self.display.say(f"run folder {self.run_dir}  (topics {self.topics.prefix}.*)")
        simulated = False
        try:
            model_dir = await self._model_dir()
            await self._broker()
            await self._start_services(model_dir)
            if not self.stop.is_set():
                simulated = True
                await self._simulate(outcomes)
        finally:
            await self._stop_services()
            if self.follower is not None:
                self.follower.stop()
            report_path, verdict = None, {}
            try:
                if simulated:
                    report_path, verdict = await self._report(outcomes)
            finally:
                await self._stop_broker()
        return DemoResult(
            self.run_dir,
            report_path,
            outcomes,
            self.bootstrap,
            self.topics,
            self.progress.summary,
            verdict,
            time.monotonic() - t0,
        )

    async def _model_dir(self) -> Path:
        if self.config.model_dir:
            path = Path(self.config.model_dir)
            if not (path / "config.json").is_file():
                raise DemoError(f"--model-dir {path} has no config.json; pass a Hugging Face model directory")
            return path.resolve()
        path = DEFAULT_MODEL_DIR.resolve()
        if not (path / "config.json").is_file():
            self.display.say(f"writing the tiny model to {path}")
            await self._run_command("init-model", cli("init-model", "--preset", "tiny", str(path)))
        return path

    async def _run_command(self, name: str, command: list[str]) -> str:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        output, _ = await proc.communicate()
        text = output.decode("utf-8", errors="replace")
        log_path.write_text(text, encoding="utf-8")
        if proc.returncode != 0:
            raise DemoError(
                f"`rlhf-online {' '.join(command[3:])}` failed (exit code {proc.returncode}):\n{text[-3000:]}"
            )
        return text

    async def _broker(self) -> None:
        from rlhf_online.broker.clients import ensure_topics
        from rlhf_online.broker.local import broker_status

        if not self.bootstrap:
            status = broker_status(Path(self.config.kafka_home))
            if status.running and status.bootstrap:
                self.bootstrap = status.bootstrap
                self.display.say(f"kafka: reusing the broker at {self.bootstrap} (pid {status.pid})")
            else:
                self.display.say("kafka: starting the local broker (the first time, Maven fetches its jars)")
                command = cli(
                    "kafka",
                    "start",
                    "--kafka-home",
                    self.config.kafka_home,
                    "--topic-prefix",
                    self.topics.prefix,
                    "--kafka-partitions",
                    str(PARTITIONS),
                )
                self.started_broker = True
                self.display.say((await self._run_command("kafka", command)).strip().splitlines()[-1])
                self.bootstrap = broker_status(Path(self.config.kafka_home)).bootstrap or ""
        await asyncio.to_thread(ensure_topics, self.bootstrap, self.topics, partitions=PARTITIONS)
        self.follower = ModelEventFollower(self.bootstrap, self.topics.models)
        self.follower.start()

    async def _start_services(self, model_dir: Path) -> None:
        registry = self.run_dir / "registry"
        self.services = service_commands(
            self.config,
            bootstrap=self.bootstrap,
            prefix=self.topics.prefix,
            registry=registry,
            model_dir=model_dir,
            run_dir=self.run_dir,
        )
        # With a baseline phase the trainer starts after it (`_simulate`), so the base model serves it all.
        await self._launch(self.services[:2] if self.config.baseline_answers else self.services)

    async def _launch(self, services: list[Service]) -> None:
        """Starts `services` and waits until each one's gRPC health says SERVING."""
        env = {**self.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.config.torch_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.config.torch_threads)
        t0 = time.monotonic()
        for service in services:
            service.start(env)
            self.display.say(
                f"{service.name}: started (pid {service.proc.pid}, gRPC {service.grpc_port}, "
                f"metrics {service.metrics_port}, log {service.log_path})"
            )
        deadline = time.monotonic() + self.config.startup_timeout_s
        for service in services:
            await wait_serving(service, deadline, self.stop)
            if not self.stop.is_set():
                self.display.say(f"{service.name}: SERVING after {time.monotonic() - t0:.0f}s")

    async def _simulate(self, outcomes: Path) -> None:
        """The users' phases: the optional baseline, the learning run, the optional final evaluation."""
        c = self.config
        self.progress = Progress(c.duration_s, f"{c.judge} (noise {c.rater_noise:.2f})")
        self.display.say("simulated users: chatting and rating (Ctrl-C stops the run and writes the report)")
        try:
            await self._phases_of_users(outcomes)
        finally:
            summary = json.dumps(self.progress.summary.to_json(), indent=2) + "\n"
            (self.run_dir / "simulate-summary.json").write_text(summary, encoding="utf-8")

    async def _phases_of_users(self, outcomes: Path) -> None:
        c = self.config
        if c.baseline_answers:
            self.progress.phase = "baseline"
            self.display.say(
                f"baseline: {c.baseline_answers} answers of the base model before the trainer starts"
            )
            await self._users(outcomes, max_requests=c.baseline_answers)
            if self.stop.is_set():
                return
            await self._launch(self.services[2:])
        self.progress.phase = "learning"
        self.progress.started = time.monotonic()  # the clock counts the learning run against --duration-s
        await self._users(outcomes, duration_s=c.duration_s)
        if c.final_answers and not self.stop.is_set():
            version = await self._freeze_policy()
            self.progress.phase = "final evaluation"
            self.display.say(f"final evaluation: {c.final_answers} answers of {version}, the trainer stopped")
            await self._users(outcomes, max_requests=c.final_answers)

    async def _freeze_policy(self) -> str:
        """Stops the trainer, then waits until serving runs the last version it published; returns it."""
        await self._stop([self.services[2]])
        latest = Registry(self.run_dir / "registry").latest("policy") or ""
        key = f'rlhf_inference_model_version_info{{version="{latest}"}}'
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if (await asyncio.to_thread(scrape, self.services[0].metrics_port)).get(key) == 1.0:
                return latest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)
        self.display.say(f"warning: serving did not switch to {latest}; evaluating the version it serves")
        return self.progress.serving

    async def _users(self, outcomes: Path, *, duration_s: float = 0.0, max_requests: int = 0) -> None:
        """Runs the simulated users until `duration_s` or `max_requests` (or Ctrl-C), updating the display."""
        c = self.config
        inference = self.services[0]
        sim_config = SimulateConfig(
            target=f"127.0.0.1:{inference.grpc_port}",
            judge=c.judge,
            judge_args=c.judge_args,
            rater_noise=c.rater_noise,
            rated_share=c.rated_share,
            concurrency=c.concurrency,
            users=c.users,
            rate=c.rate,
            max_new_tokens=c.max_new_tokens,
            duration_s=duration_s,
            max_requests=max_requests,
            seed=c.seed + self._phases_run,  # each phase draws users and prompts of its own
            outcomes_path=str(outcomes),
        )
        self._phases_run += 1
        task = asyncio.create_task(simulate(sim_config, stop=self.stop, on_outcome=self.progress.on_outcome))
        rounds_file = self.run_dir / "rounds.jsonl"
        while not task.done():
            await self._poll(rounds_file)
            self.display.show(self.progress.lines())
            await asyncio.wait({task}, timeout=self.config.refresh_s)
        task.result()  # raises what the simulator raised
        await self._poll(rounds_file)
        self.display.show(self.progress.lines(), force=True)

    async def _poll(self, rounds_file: Path) -> None:
        trainer, inference = self.services[2], self.services[0]
        trainer_samples, inference_samples = await asyncio.gather(
            asyncio.to_thread(scrape, trainer.metrics_port), asyncio.to_thread(scrape, inference.metrics_port)
        )
        if inference_samples:
            self.progress.inference = inference_samples
        new = self.progress.update_trainer(trainer_samples)
        if new:
            with open(rounds_file, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(asdict(r)) + "\n" for r in new)
        if self.follower is not None:
            self.progress.models = self.follower.snapshot()

    async def _stop_services(self) -> None:
        await self._stop(self.services)

    async def _stop(self, services: list[Service]) -> None:
        """SIGTERM to the running ones among `services` (last first), SIGKILL after the shutdown timeout."""
        running = [s for s in services if s.running()]
        if not running:
            return
        self.display.say(f"stopping {', '.join(s.name for s in running)} (SIGTERM)")
        for service in reversed(running):
            service.terminate()
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while (
            any(s.exited() is None for s in running)
            and time.monotonic() < deadline
            and not self.hurry.is_set()
        ):
            await asyncio.sleep(0.2)
        for service in running:
            if service.exited() is None:
                self.display.say(f"{service.name} still running; SIGKILL")
                service.kill()
            if service.proc is not None:
                await asyncio.to_thread(service.proc.wait)

    async def _report(self, outcomes: Path) -> tuple[Path, dict]:
        self.display.say("writing the report from the topics")
        data = await asyncio.to_thread(report.load_from_kafka, self.bootstrap, self.topics)
        if outcomes.is_file():
            data.judged = report.load_outcomes(outcomes)
        rounds_file = self.run_dir / "rounds.jsonl"
        if rounds_file.is_file():
            data.rounds = report.load_rounds(rounds_file)
        title = f"rlhf-online demo {self.run_dir.name}"
        notes = [
            f"Judge: {self.config.judge} {self.config.judge_args}; rater noise {self.config.rater_noise}; "
            f"topics {self.topics.prefix}.*; logs in {self.run_dir / 'logs'}."
        ]
        path = await asyncio.to_thread(report.write_report, data, self.run_dir, title=title, notes=notes)
        verdict = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        return path, verdict

    async def _stop_broker(self) -> None:
        if self.started_broker and not self.config.keep_broker:
            self.display.say("kafka: stopping the broker the demo started (--keep-broker leaves it running)")
            with contextlib.suppress(DemoError):
                await self._run_command(
                    "kafka-stop", cli("kafka", "stop", "--kafka-home", self.config.kafka_home)
                )


def closing_lines(result: DemoResult) -> list[str]:
    """Closing figures: first and last version's thumbs-up rates with their ratings, rounds, swaps, time."""
    v = result.verdict
    lines = [v.get("headline", "no report was written")]

    def version(d: dict | None) -> str:
        return f"{d['version']} {d['up_rate']:.1%} of {d['ratings']} ratings" if d else "-"

    if v:
        lines.append(f"first version {version(v.get('first'))}; last version {version(v.get('last'))}")
        lines.append(
            f"PPO rounds {v.get('rounds', 0)} (published {v.get('rounds_published', 0)}), swaps "
            f"{v.get('swaps', 0)}, wall time {result.wall_time_s / 60:.1f} min"
        )
    if result.report_path is not None:
        lines.append(f"report: {result.report_path}")
    return lines


async def run_demo(
    config: DemoConfig,
    *,
    out: TextIO = sys.stdout,
    env: Mapping[str, str] | None = None,
    install_signal_handlers: bool = False,
) -> DemoResult:
    """Runs the whole demo; with `install_signal_handlers`, Ctrl-C (or SIGTERM) stops it cleanly."""
    demo = Demo(config, out=out, env=env)
    if install_signal_handlers:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, demo.interrupt)
    return await demo.run()


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(DemoConfig, argv, env, prog="rlhf-online demo")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs its own retries, and a metadata refresh that close() cancels, at ERROR; in this
    # terminal they would only break the progress block: failures show there as errors, and in the run's logs.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        result = asyncio.run(run_demo(config, env=env, install_signal_handlers=True))
    except DemoError as e:
        print(f"rlhf-online demo: {e}", file=sys.stderr)
        return 1
    for line in closing_lines(result):
        print(line)
    return 0 if result.report_path is not None else 1
