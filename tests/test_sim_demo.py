"""The demo's pieces: service flags and child processes (processes), the live progress (progress), following
the models and rounds topics (follower, on the real broker), and a short real demo that shows and reports the
trainer's RoundEvents."""

import asyncio
import io
import json
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from rlhf_online.config import parse_config
from rlhf_online.contract import (
    POLICY,
    REWARD,
    RewardFigure,
    RoundFigure,
    model_event,
    model_event_key,
    round_event_key,
)
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.sim import demo, processes, progress, runlog
from rlhf_online.sim.config import DemoConfig
from rlhf_online.sim.demo_presets import preset_for, with_preset
from rlhf_online.sim.follower import EventFollower
from rlhf_online.sim.processes import DemoError, Service, free_port
from rlhf_online.sim.progress import Display, Progress
from rlhf_online.sim.simulate import Outcome

# ------------------------------------------------------------------------------------------- processes


def _services(config: DemoConfig, tmp_path: Path, model_dir: Path) -> processes.Services:
    return processes.service_commands(
        config,
        bootstrap="127.0.0.1:1",
        prefix="demo-x",
        registry=tmp_path / "r",
        model_dir=model_dir,
        run_dir=tmp_path,
    )


def test_service_flags_parse_with_the_services_configs(tmp_path):
    from rlhf_online.inference.config import InferenceConfig
    from rlhf_online.reward.config import RewardConfig
    from rlhf_online.trainer.config import TrainerConfig

    services = _services(
        DemoConfig(trainer_args="--min-new-ratings 16", device="cpu"), tmp_path, tmp_path / "m"
    )
    classes = {"inference": InferenceConfig, "reward": RewardConfig, "trainer": TrainerConfig}
    assert [s.name for s in services.all()] == ["inference", "reward", "trainer"]
    ports = set()
    for service in services.all():
        assert service.command[:4] == [sys.executable, "-m", "rlhf_online.cli", f"serve-{service.name}"]
        parsed = parse_config(classes[service.name], service.command[4:], {})
        assert parsed.topic_prefix == "demo-x" and parsed.registry_dir == str(tmp_path / "r")
        assert parsed.grpc_port == service.grpc_port and parsed.metrics_port == service.metrics_port
        ports |= {service.grpc_port, service.metrics_port}
    assert len(ports) == 6
    assert (
        services.inference.health_service == processes.CHAT_SERVICE and services.trainer.health_service == ""
    )
    assert parse_config(TrainerConfig, services.trainer.command[4:], {}).min_new_ratings == 16
    # Not the tiny model: a reward model of the base's bottom 2 blocks, all of them trained.
    reward = parse_config(RewardConfig, services.reward.command[4:], {})
    assert (reward.backbone_layers, reward.trainable_layers, reward.pooling) == (2, 2, "response_mean")
    # ... and the PPO round sized for a real model: the top 4 blocks at lr 1e-4, rejected candidates carried
    trainer = parse_config(TrainerConfig, services.trainer.command[4:], {})
    assert (trainer.trainable_layers, trainer.learning_rate, trainer.keep_rejected) == (4, 1e-4, True)


def test_the_demo_runs_the_tiny_preset_by_default_and_smollm2_on_request(tiny_model_dir, tmp_path):
    smollm2 = DemoConfig(model="smollm2-135m")
    real = with_preset(smollm2, preset_for(smollm2))
    assert preset_for(smollm2).model_dir == Path(".rlhf/models/smollm2-135m")
    assert (real.judge, real.max_new_tokens, real.rate) == ("addresses_user", 48, 0.7)
    tiny = with_preset(DemoConfig(), preset_for(DemoConfig()))
    assert (tiny.judge, tiny.max_new_tokens, tiny.rate, tiny.duration_s) == ("lowercase", 32, 3.0, 360.0)
    # a folder of the tiny preset gets the tiny settings; the user's own settings always win
    mine = DemoConfig(model_dir=str(tiny_model_dir), judge="contains", rate=0.0)
    assert preset_for(mine).model_dir == tiny_model_dir and preset_for(mine).init_preset == ""
    assert (with_preset(mine, preset_for(mine)).judge, with_preset(mine, preset_for(mine)).rate) == (
        "contains",
        0.0,
    )
    other = tmp_path / "my-llm"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama", "vocab_size": 32000}')
    assert preset_for(DemoConfig(model_dir=str(other))).judge == "addresses_user"
    assert preset_for(DemoConfig(model_dir=str(other))).label == "your model (my-llm)"


def test_the_tiny_model_gets_a_reward_model_sized_for_it(tiny_model_dir, tmp_path):
    from rlhf_online.reward.config import RewardConfig

    reward = _services(DemoConfig(reward_args="--steps-per-update 2"), tmp_path, tiny_model_dir).reward
    parsed = parse_config(RewardConfig, reward.command[4:], {})
    assert (parsed.backbone_layers, parsed.max_length, parsed.trainable_layers) == (0, 40, -1)
    assert parsed.steps_per_update == 2  # the user's flags win


def test_scrape_reads_prometheus_text():
    registry = CollectorRegistry()
    Counter("demo_test_rounds", "r", ["outcome"], registry=registry).labels("published").inc(2)
    Gauge("demo_test_gauge", "g", registry=registry).set(1.5)
    port = free_port()
    server, thread = start_http_server(port, registry=registry)
    try:
        samples = processes.scrape(port)
    finally:
        server.shutdown()
        thread.join()
    assert samples['demo_test_rounds_total{outcome="published"}'] == 2.0
    assert samples["demo_test_gauge"] == 1.5
    assert processes.scrape(free_port(), timeout_s=0.5) == {}


def _child(name: str, code: str, tmp_path: Path) -> Service:
    return Service(name, [sys.executable, "-c", code], free_port(), free_port(), "", tmp_path / f"{name}.log")


async def test_wait_serving_reports_a_service_that_exits(tmp_path):
    service = _child("broken", "print('boom'); raise SystemExit(3)", tmp_path)
    service.start({})
    with pytest.raises(DemoError, match=r"(?s)broken exited with code 3.*boom"):
        await asyncio.wait_for(processes.wait_serving(service, time.monotonic() + 60, asyncio.Event()), 60)


async def test_wait_serving_times_out_and_stop_all_terminates(tmp_path):
    service = _child("sleeper", "import time; time.sleep(60)", tmp_path)
    service.start({})
    with pytest.raises(DemoError, match="not SERVING in time"):
        await processes.wait_serving(service, time.monotonic() + 1.0, asyncio.Event())
    said = []
    await processes.stop_all([service], timeout_s=60, hurry=asyncio.Event(), say=said.append)
    assert service.exited() == -15 and said == ["stopping sleeper (SIGTERM)"]


async def test_stop_all_kills_a_service_that_ignores_sigterm(tmp_path):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(60)"
    )
    service = _child("stubborn", code, tmp_path)
    service.start({})
    deadline = time.monotonic() + 60
    while "ready" not in service.log_tail() and time.monotonic() < deadline:  # SIGTERM only once ignored
        await asyncio.sleep(0.05)
    said = []
    await processes.stop_all([service], timeout_s=0.5, hurry=asyncio.Event(), say=said.append)
    assert service.exited() == -9 and said[-1] == "stubborn still running; SIGKILL"


async def test_stop_all_skips_services_never_started(tmp_path):
    # With --baseline-answers the trainer starts late; a Ctrl-C before then must not wait for it.
    never = Service("trainer", ["true"], 1, 2, "", tmp_path / "t.log")
    assert not never.running() and never.exited() is None
    said = []
    # a hang guard: waiting for a process that never started would take the whole 600 s
    await asyncio.wait_for(
        processes.stop_all([never], timeout_s=600, hurry=asyncio.Event(), say=said.append), 60
    )
    assert said == []  # nothing to stop, so nothing said


# -------------------------------------------------------------------------------------------- progress


def _outcome(i: int, version: str, up: bool) -> Outcome:
    return Outcome(
        index=i,
        user_id="u",
        prompt="p",
        stream=False,
        started_ms=0,
        model_version=version,
        rating="up" if up else "down",
        acknowledged=True,
        p_up=0.5,
    )


def _round(n: int, outcome: int, reason: str = "", **metrics: float) -> events_pb2.RoundEvent:
    return events_pb2.RoundEvent(
        round=n, name=f"round-{n:06d}", outcome=outcome, gate_reason=reason, metrics=metrics
    )


def _events():
    """Two reward checkpoints, one policy version, and three rounds: passed, rejected, failed."""
    models = [
        model_event(REWARD, events_pb2.PUBLISHED, "v000001", metrics={RewardFigure.HELDOUT_ACCURACY: 0.6}),
        model_event(
            REWARD,
            events_pb2.PUBLISHED,
            "v000002",
            metrics={RewardFigure.HELDOUT_ACCURACY: 0.8, RewardFigure.RATINGS_APPLIED: 120},
        ),
        model_event(POLICY, events_pb2.PUBLISHED, "v000002", parent_version="v000001"),
    ]
    figures = {RoundFigure.REWARD_MEAN: 0.25, RoundFigure.KL_PER_RESPONSE: 0.5}
    rounds = [
        _round(1, events_pb2.PASSED, "candidate better by 0.10", **figures),
        _round(2, events_pb2.FAILED, "CUDA out of memory"),
        _round(3, events_pb2.REJECTED, "no improvement: -0.02 < margin 0.00", **figures),
    ]
    return models, rounds


def test_progress_shows_versions_rounds_and_the_last_gate_reason():
    shown = Progress(duration_s=60, judge="lowercase")
    for i in range(10):
        shown.on_outcome(_outcome(i, "v000001" if i < 6 else "v000002", up=i >= 6))
    assert shown.summary.versions["v000001"].up_rate == 0.0 and shown.serving == "v000002"
    models, rounds = _events()
    shown.on_events([runlog.model_change(m) for m in models], [runlog.round_record(r) for r in rounds])
    shown.on_metrics({progress.INFERENCE_SWAPS: 3.0}, {})
    text = "\n".join(shown.lines())
    assert "v000002" in text and "<- serving" in text and "100.0%" in text
    assert "reward model: v000002, held-out accuracy 80.0% after 120 ratings (2 checkpoints)" in text
    assert (
        "PPO rounds 3 (gate passed 1, rejected 1, failed 1); last: round-000003 rejected, reward 0.250"
        in text
    )
    assert "gate: no improvement: -0.02 < margin 0.00" in text
    assert "policy versions published 1   swaps in serving 3" in text


def test_progress_before_any_round_reads_the_trainers_waiting_gauge():
    shown = Progress(duration_s=60, judge="lowercase")
    assert "PPO: no round yet" in shown.lines() and "reward model: no checkpoint yet" in shown.lines()
    shown.on_metrics({}, {progress.TRAINER_NEW_RATINGS: 12.0})
    shown.on_metrics({}, {})  # a scrape that got nothing leaves the figure as it was
    assert "PPO: no round yet (12 new ratings)" in shown.lines()


def test_display_redraws_on_a_terminal_and_throttles_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    display = Display(tty)
    display.show(["a", "b"])
    display.show(["c", "d"])
    assert "\x1b[2F\x1b[J" in tty.getvalue() and tty.getvalue().endswith("c\nd\n")
    plain = io.StringIO()
    display = Display(plain, every_s=3600)
    display.show(["x"])
    display.show(["y"])  # throttled
    display.show(["z"], force=True)
    assert plain.getvalue() == "x\n\nz\n\n"


# ------------------------------------------------------------------------------------------------ the run


def test_closing_lines():
    result = demo.DemoResult(
        Path("r"),
        Path("r/report.html"),
        Path("r/o"),
        "b",
        None,
        None,
        wall_time_s=90,
        verdict={
            "headline": "The loop is learning",
            "rounds": 4,
            "rounds_published": 3,
            "swaps": 3,
            "first": {"version": "v000001", "up_rate": 0.2, "ratings": 100},
            "last": {"version": "v000004", "up_rate": 0.7, "ratings": 50},
        },
    )
    text = "\n".join(demo.closing_lines(result))
    assert "v000001 20.0% of 100 ratings" in text and "v000004 70.0% of 50 ratings" in text
    assert (
        "PPO rounds 4 (gate passed 3), swaps 3, wall time 1.5 min" in text and "report: r/report.html" in text
    )


def test_demo_config_validation():
    with pytest.raises(ValueError, match="duration_s"):
        DemoConfig(duration_s=-1)
    with pytest.raises(ValueError, match="use smollm2-135m or tiny"):
        DemoConfig(model="gpt-5")
    with pytest.raises(ValueError, match="baseline_answers and final_answers"):
        DemoConfig(final_answers=-1)
    parsed = parse_config(DemoConfig, ["--baseline-answers", "150", "--final-answers", "120"], {})
    assert (parsed.baseline_answers, parsed.final_answers) == (150, 120)


# ------------------------------------------------------------------------------------- on the real broker


@pytest.mark.kafka
def test_follower_reads_model_and_round_events(kafka_bootstrap, topics):
    from rlhf_online.broker.clients import make_producer

    models, rounds = _events()
    producer = make_producer(kafka_bootstrap, client_id="test-follower")
    producer.send(topics.models, key=model_event_key(models[0]), value=models[0].SerializeToString())
    follower = EventFollower(kafka_bootstrap, topics)
    follower.start()  # from the beginning: the event sent before it started is read too
    try:
        for m in models[1:]:
            producer.send(topics.models, key=model_event_key(m), value=m.SerializeToString())
        producer.send(topics.rounds, key=round_event_key(), value=b"\xff\xffnot a proto")
        for r in rounds:
            producer.send(topics.rounds, key=round_event_key(), value=r.SerializeToString())
        producer.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and [len(x) for x in follower.snapshot()] != [3, 3]:
            time.sleep(0.1)
        seen_models, seen_rounds = follower.snapshot()
    finally:
        follower.stop()
        producer.close()
    assert [(m.kind, m.version) for m in seen_models] == [
        (REWARD, "v000001"),
        (REWARD, "v000002"),
        (POLICY, "v000002"),
    ]
    assert [(r.name, r.outcome) for r in seen_rounds] == [
        ("round-000001", runlog.PASSED),
        ("round-000002", runlog.FAILED),
        ("round-000003", runlog.REJECTED),
    ]
    assert not follower.is_alive()


# The trainer made quick: a round every 16 new ratings on 16 rollouts, one PPO epoch, a small gate.
QUICK_TRAINER = "--min-new-ratings 16 --rollouts-per-round 16 --ppo-epochs 1 --eval-prompts 4"


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_short_demo_shows_and_reports_the_trainers_rounds(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path
):
    """The whole demo, stopped (as by Ctrl-C) once the first RoundEvent showed in its progress block."""
    config = DemoConfig(
        duration_s=900,  # a cap only: the test interrupts at the first round
        run_dir=str(tmp_path / "run"),
        model_dir=str(tiny_model_dir),
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        baseline_answers=0,
        final_answers=0,
        users=50,
        concurrency=4,
        trainer_args=QUICK_TRAINER,
    )
    out = io.StringIO()
    run = demo.Demo(config, out=out)

    async def interrupt_at_the_first_round() -> None:
        while not run.progress.rounds:
            await asyncio.sleep(0.5)
        run.interrupt()

    watcher = asyncio.create_task(interrupt_at_the_first_round())
    try:
        result = await run.run()
    finally:
        watcher.cancel()
    log = out.getvalue()
    assert run.progress.rounds, log
    assert "PPO rounds " in log and "(gate passed " in log

    # The report's rounds are the topic's RoundEvents, and the run folder keeps a copy.
    from rlhf_online.broker.clients import read_topic

    on_topic = runlog.parse_records(read_topic(kafka_bootstrap, topics.rounds), events_pb2.RoundEvent)
    names = [r.name for r in on_topic]
    assert names and [r.name for r in runlog.load_rounds(result.run_dir / "rounds.jsonl")] == names
    assert result.verdict["rounds"] == len(names)
    assert all(r.outcome in runlog.OUTCOMES for r in runlog.load_rounds(result.run_dir / "rounds.jsonl"))
    assert names[0] in result.report_path.read_text()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds_published"] == sum(r.outcome == events_pb2.PASSED for r in on_topic)
    assert all(s.exited() is not None for s in run.services.all())
