"""The processes of one fault scenario: `rlhf-online serve-*` children on free ports, started, killed,
restarted and stopped as the demo does it (rlhf_online/sim/processes.py), plus a broker of the scenario's own.

    cluster = Cluster(bootstrap, topics, tmp_path, tiny_model_dir)
    a = cluster.inference("a")
    await cluster.start(a)
    await cluster.kill(a)          # SIGKILL
    await cluster.start(a)         # the same ports, incarnation 2
    assert await cluster.stop(a) == 0

A process keeps its ports across restarts, so clients' channels reconnect to the new incarnation by
themselves.
"""

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_online.broker.local import broker_status, start_broker, stop_broker
from rlhf_online.registry import Registry
from rlhf_online.sim.processes import (
    CHAT_SERVICE,
    TINY_MODEL_FLAGS,
    Service,
    child_env,
    cli,
    free_port,
    scrape,
    wait_serving,
)
from rlhf_online.topics import Topics

SIGNING_KEY = "fault-matrix-signing-key-0123456789"
START_TIMEOUT_S = 120.0  # a service's start on the loaded 2-core dev machine takes 15-30 s
STOP_TIMEOUT_S = 60.0
# Fast answers, and no per-user rate limit in the way of the load driver's bounded bursts.
INFERENCE_FLAGS = {
    "--default-max-new-tokens": "8",
    "--max-new-tokens-cap": "16",
    "--feedback-rate-per-s": "1000",
    "--feedback-burst": "1000",
    "--shutdown-grace-s": "5",
}
# The demo's tiny reward model, updating and checkpointing often, so kills land on checkpoints.
REWARD_FLAGS = {
    **TINY_MODEL_FLAGS["reward"],
    "--update-every-examples": "8",
    "--update-interval-s": "1",
    "--checkpoint-every-updates": "1",
    "--checkpoint-interval-s": "1",
    "--eval-every-updates": "1000",
    "--keep-versions": "0",
}
# Short rounds whose candidate always passes the gate (the matrix checks publishing, not learning).
TRAINER_FLAGS = {
    "--min-new-ratings": "0",
    "--round-interval-s": "1",
    "--no-require-new-reward": "",
    "--poll-interval-s": "0.5",
    "--gate-margin": "-1000",
    "--rollouts-per-round": "8",
    "--generation-batch-size": "8",
    "--minibatch-size": "8",
    "--ppo-epochs": "1",
    "--max-new-tokens": "8",
    "--eval-prompts": "2",
    "--eval-samples-per-prompt": "1",
    "--keep-versions": "0",
}


@dataclass
class Proc:
    """A service of the scenario; `incarnation` counts its starts (1 = the first process)."""

    name: str
    service: Service
    incarnation: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.grpc_port}"

    @property
    def tag(self) -> str:
        """The running process, as the ledger records it: "a#2" is replica a's second incarnation."""
        return f"{self.name}#{self.incarnation}"

    @property
    def pid(self) -> int:
        return self.service.proc.pid

    def metrics(self) -> dict[str, float]:
        return scrape(self.service.metrics_port)

    def log_tail(self, lines: int = 40) -> str:
        return self.service.log_tail(lines)

    def journal_replays(self) -> list[int]:
        """Records each incarnation's outbox journal sent for an earlier one (from its log), in order."""
        text = self.service.log_path.read_text(encoding="utf-8", errors="replace")
        return [int(n) for n in re.findall(r"outbox journal \S+: sending (\d+) records", text)]


class Cluster:
    """The service processes of one scenario, on one broker, topic prefix and registry."""

    def __init__(self, bootstrap: str, topics: Topics, run_dir: Path, model_dir: Path) -> None:
        self.bootstrap, self.topics, self.run_dir, self.model_dir = bootstrap, topics, run_dir, model_dir
        self.registry = Registry(run_dir / "registry")
        self.procs: list[Proc] = []

    def inference(self, name: str, **flags: str) -> Proc:
        """An inference replica; replicas of one cluster share the signing key, so each takes the others'
        ratings. Each has its own outbox journal, which its next incarnation replays."""
        extra = {
            "--replica-id": name,
            "--signing-key": SIGNING_KEY,
            "--outbox-dir": str(self.run_dir / "outbox" / name),
            **INFERENCE_FLAGS,
            **flags,
        }
        return self._proc(name, "inference", CHAT_SERVICE, extra)

    def reward(self, **flags: str) -> Proc:
        return self._proc("reward", "reward", "", {"--seed": "0", **REWARD_FLAGS, **flags})

    def trainer(self, **flags: str) -> Proc:
        return self._proc("trainer", "trainer", "", {"--seed": "0", **TRAINER_FLAGS, **flags})

    def _proc(self, name: str, role: str, health: str, extra: dict[str, str]) -> Proc:
        grpc_port, metrics_port = free_port(), free_port()
        flags = {
            "--kafka-bootstrap": self.bootstrap,
            "--topic-prefix": self.topics.prefix,
            "--registry-dir": str(self.registry.root),
            "--base-model-dir": str(self.model_dir),
            "--device": "cpu",
            "--torch-threads": "1",
            "--log-level": "INFO",
            "--grpc-port": str(grpc_port),
            "--metrics-port": str(metrics_port),
            **extra,
        }
        words = [w for flag, value in flags.items() for w in (flag, value) if w]
        log_path = self.run_dir / "logs" / f"{name}.log"
        service = Service(name, cli(f"serve-{role}", *words), grpc_port, metrics_port, health, log_path)
        proc = Proc(name, service)
        self.procs.append(proc)
        return proc

    async def start(self, *procs: Proc) -> None:
        """Starts `procs` together and returns once every one is SERVING (a new incarnation of each)."""
        for proc in procs:
            proc.incarnation += 1
            proc.service.start(child_env(os.environ, 1))
        deadline = time.monotonic() + START_TIMEOUT_S
        await asyncio.gather(*(wait_serving(p.service, deadline, asyncio.Event()) for p in procs))

    async def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` (SIGKILL: no handler runs, nothing is flushed) and reaps the process."""
        proc.service.proc.send_signal(sig)
        await asyncio.to_thread(proc.service.proc.wait, STOP_TIMEOUT_S)

    async def stop(self, proc: Proc) -> int:
        """SIGTERM (a graceful stop: drains, flushes, final checkpoint); returns the exit code."""
        proc.service.terminate()
        return await asyncio.to_thread(proc.service.proc.wait, STOP_TIMEOUT_S)

    def close(self) -> None:
        """SIGKILLs whatever still runs (the end of a failed scenario)."""
        for proc in self.procs:
            proc.service.kill()
            if proc.service.proc is not None:
                with contextlib.suppress(Exception):
                    proc.service.proc.wait(10)


def kill_during_publish(proc: Proc, kind_dir: Path, timeout_s: float) -> str:
    """SIGKILLs `proc` while it is inside a registry publish of `kind_dir`; returns the name of the temp entry
    it was writing (`.tmp-<pid>-...` folder: the version's files; `.tmp-LATEST-...`: moving LATEST).

    Watches for a temp entry the registry makes during a publish (named with the writer's pid); when one of
    `proc`'s appears the process is frozen (SIGSTOP) and, if the entry is still there, killed: so the kill
    lands inside the publish, not after it. Blocking: run it in a thread.
    """
    known = set(_temps(kind_dir, proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.service.running():
            raise RuntimeError(f"{proc.name} exited while waiting for a publish:\n{proc.log_tail()}")
        if set(_temps(kind_dir, proc.pid)) - known:
            os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc.pid)
            caught = sorted(set(_temps(kind_dir, proc.pid)) - known)
            if caught:
                os.kill(proc.pid, signal.SIGKILL)
                proc.service.proc.wait(STOP_TIMEOUT_S)
                return caught[0]
            os.kill(proc.pid, signal.SIGCONT)  # it finished that publish just before it stopped
        time.sleep(0.002)
    raise TimeoutError(f"{proc.name} published nothing in {kind_dir} within {timeout_s:.0f}s")


def _temps(kind_dir: Path, pid: int) -> list[str]:
    """The registry's temp entries of process `pid`: `.tmp-<pid>-...` (files) and `.tmp-LATEST-<pid>-...`."""
    mine = (f".tmp-{pid}-", f".tmp-LATEST-{pid}-")
    with contextlib.suppress(FileNotFoundError):
        return [e.name for e in os.scandir(kind_dir) if e.name.startswith(mine)]
    return []


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until the kernel shows `pid` stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise TimeoutError(f"pid {pid} did not stop within {timeout_s:.0f}s of SIGSTOP")


class OwnBroker:
    """A Kafka broker of the matrix's own (its own home and free ports): the scenarios that kill or pause a
    broker never touch the shared test broker."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = ""

    def start(self, topics: Topics | None = None) -> str:
        self.bootstrap = start_broker(
            self.home, port=self.port, controller_port=self.controller_port, partitions=2, topics=topics
        )
        return self.bootstrap

    @property
    def pid(self) -> int:
        status = broker_status(self.home)
        if not status.running:
            raise RuntimeError(f"the broker in {self.home} is not running")
        return status.pid

    def kill(self) -> None:
        """SIGKILL, then waits until it is gone (reaped by broker_status)."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while broker_status(self.home).running:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker (pid {pid}) survived SIGKILL")
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its connections and answers nothing (the slowest broker)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        stop_broker(self.home, timeout_s=10)
