"""The demo's child processes: the three services by name, started, probed (health, metrics) and stopped.

Each service runs as `python -m rlhf_online.cli serve-<name> ...` in a session of its own (so Ctrl-C in the
terminal reaches the demo only, which stops things in order), on free ports, logging to
`<run folder>/logs/<name>.log`.
"""

import asyncio
import contextlib
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE, is_tiny_preset
from rlhf_online.sim.config import DemoConfig

CHAT_SERVICE = "rlhf.v1.ChatService"

# Settings the demo gives each service on top of their defaults; `--inference-args` etc. override them (the
# last flag wins).
DEMO_FLAGS: dict[str, dict[str, str]] = {"inference": {"--replica-id": "demo-0"}, "reward": {}, "trainer": {}}

# The demo's canary trials decide on a few hundred ratings: a decision after 30 ratings per arm at the
# earliest, promotion when the canary is significantly not worse than stable by more than 10 points (the
# trainer's default margin, 5, takes about twice the ratings; benchmarks/canary_error_rates.py), and a trial
# that lasts 10 minutes rolls back.
DEMO_CANARY_FLAGS: dict[str, str] = {
    "--canary-min-ratings": "30",
    "--canary-margin": "0.1",
    "--canary-max-seconds": "600",
}

# With the tiny model, the reward model is sized so that the loop learns within a few minutes
# on two CPU cores: the tiny model's embeddings, final norm and head, no transformer block (a character
# class is learnt from a few hundred ratings where all 4 blocks need over a thousand), pooled as
# "response_features" (mean, max, first and last token, length), so it sees how an answer starts and ends
# and what it lacks, not only its shares: on the preference suite's base answers (benchmarks/reward_suite.py,
# 800 ratings) held-out AUC rose from 0.49-0.75 to 0.96-1.00 on presence, absence, start, end and the
# combined judge, 0.49 -> 0.74 on length, 0.95 -> 0.89 on the lowercase share. It reads the answer only (the
# last 40 tokens: 32 of answer, the end of the chat template) and takes 4 steps per 32 ratings.
TINY_MODEL_FLAGS: dict[str, dict[str, str]] = {
    "reward": {
        "--backbone-layers": "0",
        "--pooling": "response_features",
        "--max-length": "40",
        "--trainable-layers": "-1",
        "--learning-rate": "1e-3",
        "--steps-per-update": "4",
        "--checkpoint-every-updates": "4",
    },
    # A random model needs big steps; the trainer's default (1e-5) is for pretrained ones.
    "trainer": {"--learning-rate": str(TINY_LEARNING_RATE)},
}

# With a real model (SmolLM2-135M-Instruct measured, docs/real-model.md). Reward: the bottom 2 of its 30
# blocks at lr 3e-3 learn the real-text judges better than the whole model (mean held-out AUC 0.89 vs 0.80
# after 150 ratings, 0.95 after 300) for a fifth of the CPU (3.6 vs 19.2 s per update); a checkpoint every
# 4 updates (64 ratings) so each round scores with what the latest ratings taught. Trainer: the oracle
# benchmark's round (the top 4 blocks at lr 1e-4, 64 rollouts of 48 tokens, 2 epochs) moves `concise` by
# about 10 points a round where the default round (2 blocks, lr 1e-5) moves nothing in four; a candidate the
# gate rejects for too small a gain is where the next round starts (64 held-out answers are noisy).
REAL_MODEL_FLAGS: dict[str, dict[str, str | None]] = {
    "reward": {
        "--backbone-layers": "2",
        "--trainable-layers": "2",
        "--learning-rate": "3e-3",
        "--checkpoint-every-updates": "4",
        # an update per 16 new ratings, as measured: at the demo's pace the 5 s default made three times
        # as many steps per rating, and the reward model's held-out AUC swung between 0.58 and 0.78
        "--update-interval-s": "30",
    },
    "trainer": {
        "--learning-rate": "1e-4",
        "--trainable-layers": "4",
        "--rollouts-per-round": "64",
        "--generation-batch-size": "32",
        "--max-new-tokens": "48",
        "--ppo-epochs": "2",
        "--keep-rejected": None,  # a switch
    },
}


class DemoError(RuntimeError):
    """The demo could not run; the message says which part failed and where its log is."""


def cli(*args: str) -> list[str]:
    """The command line of `rlhf-online ARGS` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "rlhf_online.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """One child process: a service of the loop, with its ports and log file."""

    name: str
    command: list[str]
    grpc_port: int
    metrics_port: int
    health_service: str  # the name whose health means "ready" ("" = the whole server)
    log_path: Path
    tgi_port: int = -1  # inference's TGI HTTP port when the users chat over TGI (-1: off)
    proc: subprocess.Popen | None = None

    def start(self, env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
            )

    def exited(self) -> int | None:
        """The exit code once it has exited; None while it runs or before it started."""
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
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running():
            self.proc.kill()


@dataclass
class Services:
    """The three services of the loop, by name."""

    inference: Service
    reward: Service
    trainer: Service

    def all(self) -> list[Service]:
        """In start order: serving first, the trainer last (it needs a reward checkpoint)."""
        return [self.inference, self.reward, self.trainer]


def _flags(values: Mapping[str, str | None]) -> list[str]:
    """Command-line words; a flag whose value is None is a switch (`--keep-rejected`)."""
    return [word for flag, value in values.items() for word in ((flag,) if value is None else (flag, value))]


def _common_flags(config: DemoConfig, bootstrap: str, prefix: str, registry: Path, model_dir: Path) -> dict:
    """The flags every service gets: where the broker, the topics, the registry and the model are."""
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
    return common


def _service(name: str, config: DemoConfig, common: dict, tiny: bool, run_dir: Path) -> Service:
    """One service on free ports: the common flags, the demo's, the tiny model's, then the user's."""
    grpc_port, metrics_port = free_port(), free_port()
    flags = {
        **common,
        "--grpc-port": str(grpc_port),
        "--metrics-port": str(metrics_port),
        **DEMO_FLAGS[name],
        **(TINY_MODEL_FLAGS if tiny else REAL_MODEL_FLAGS).get(name, {}),
    }
    tgi_port = free_port() if name == "inference" and config.protocol == "tgi" else -1
    if name == "inference":
        flags["--signing-key"] = secrets.token_hex(32)
        flags["--outbox-dir"] = str(run_dir / "outbox")
        flags["--tgi-port"] = str(tgi_port)
    else:
        flags["--seed"] = str(config.seed)
    if name == "trainer" and config.canary_share:
        flags |= {
            "--canary-share": str(config.canary_share),
            "--drain-trial-timeout-s": str(config.trial_wait_s),
            **DEMO_CANARY_FLAGS,
        }
    command = cli(f"serve-{name}", *_flags(flags), *shlex.split(getattr(config, f"{name}_args")))
    health = CHAT_SERVICE if name == "inference" else ""
    log = run_dir / "logs" / f"{name}.log"
    return Service(name, command, grpc_port, metrics_port, health, log, tgi_port=tgi_port)


def service_commands(
    config: DemoConfig, *, bootstrap: str, prefix: str, registry: Path, model_dir: Path, run_dir: Path
) -> Services:
    """The three services of the loop, on free ports, with the demo's settings plus the user's extra flags."""
    common = _common_flags(config, bootstrap, prefix, registry, model_dir)
    tiny = is_tiny_preset(model_dir)
    return Services(
        *(_service(name, config, common, tiny, run_dir) for name in ("inference", "reward", "trainer"))
    )


def child_env(env: Mapping[str, str], torch_threads: int) -> dict[str, str]:
    """The services' environment: unbuffered logs, and as many BLAS threads as torch threads."""
    out = {**env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if torch_threads:
        out["OMP_NUM_THREADS"] = out["MKL_NUM_THREADS"] = str(torch_threads)
    return out


# ------------------------------------------------------------------------------------------------- probing


async def wait_serving(service: Service, deadline: float, stop: asyncio.Event) -> None:
    """Polls the service's gRPC health until SERVING; raises DemoError if it exits or the deadline passes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service.health_service)
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
                if (await stub.Check(request, timeout=2.0)).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def scrape(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """A Prometheus endpoint's samples as {'name{label="v",...}': value}; {} when it does not answer.

    The demo reads current state only this way (the version serving now, the trainer's waiting ratings),
    never history: rounds and versions come from the topics.
    """
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


# ------------------------------------------------------------------------------------------------ stopping


async def stop_all(
    services: list[Service], *, timeout_s: float, hurry: asyncio.Event, say: Callable[[str], None]
) -> None:
    """SIGTERM to the running ones among `services` (last first), SIGKILL after `timeout_s` or at `hurry`."""
    running = [s for s in services if s.running()]
    if not running:
        return
    say(f"stopping {', '.join(s.name for s in running)} (SIGTERM)")
    for service in reversed(running):
        service.terminate()
    deadline = time.monotonic() + timeout_s
    while any(s.exited() is None for s in running) and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(0.2)
    for service in running:
        if service.exited() is None:
            say(f"{service.name} still running; SIGKILL")
            service.kill()
        await asyncio.to_thread(service.proc.wait)


async def run_command(command: list[str], log_path: Path, env: Mapping[str, str]) -> str:
    """Runs a one-off `rlhf-online` command (init-model, kafka start) to its end; returns its output.

    Raises:
        DemoError: it failed, with the end of its output.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
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
