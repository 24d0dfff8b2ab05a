"""Pieces of the demo that need no running services: flags, progress, display, child-process handling."""

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from rlhf_online.config import parse_config
from rlhf_online.sim import demo
from rlhf_online.sim.config import DemoConfig
from rlhf_online.sim.report import ModelChange
from rlhf_online.sim.simulate import Outcome


def test_service_flags_parse_with_the_services_configs(tmp_path):
    from rlhf_online.inference.config import InferenceConfig
    from rlhf_online.reward.config import RewardConfig
    from rlhf_online.trainer.config import TrainerConfig

    config = DemoConfig(trainer_args="--min-new-ratings 16", device="cpu")
    services = demo.service_commands(
        config,
        bootstrap="127.0.0.1:1",
        prefix="demo-x",
        registry=tmp_path / "r",
        model_dir=tmp_path / "m",
        run_dir=tmp_path,
    )
    classes = {"inference": InferenceConfig, "reward": RewardConfig, "trainer": TrainerConfig}
    ports = set()
    for service in services:
        assert service.command[:3] == [sys.executable, "-m", "rlhf_online.cli"]
        assert service.command[3] == f"serve-{service.name}"
        parsed = parse_config(classes[service.name], service.command[4:], {})
        assert parsed.topic_prefix == "demo-x" and parsed.registry_dir == str(tmp_path / "r")
        assert parsed.grpc_port == service.grpc_port and parsed.metrics_port == service.metrics_port
        ports |= {service.grpc_port, service.metrics_port}
    assert len(ports) == 6
    assert parse_config(TrainerConfig, services[2].command[4:], {}).min_new_ratings == 16
    # Not the tiny model: the reward service keeps its own defaults.
    assert parse_config(RewardConfig, services[1].command[4:], {}).backbone_layers == -1


def test_the_tiny_model_gets_a_reward_model_sized_for_it(tiny_model_dir, tmp_path):
    from rlhf_online.reward.config import RewardConfig

    config = DemoConfig(reward_args="--steps-per-update 2")
    reward = demo.service_commands(
        config, bootstrap="b:1", prefix="p", registry=tmp_path, model_dir=tiny_model_dir, run_dir=tmp_path
    )[1]
    parsed = parse_config(RewardConfig, reward.command[4:], {})
    assert (parsed.backbone_layers, parsed.max_length, parsed.trainable_layers) == (0, 40, -1)
    assert parsed.steps_per_update == 2  # the user's flags win


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


def test_progress_counts_versions_rounds_and_renders():
    progress = demo.Progress(duration_s=60, judge="lowercase")
    for i in range(10):
        progress.on_outcome(_outcome(i, "v000001" if i < 6 else "v000002", up=i >= 6))
    assert progress.summary.versions["v000001"].up_rate == 0.0
    assert progress.summary.versions["v000002"].up_rate == 1.0
    assert progress.serving == "v000002"
    samples = {
        'rlhf_trainer_rounds_total{outcome="rejected"}': 1.0,
        "rlhf_trainer_reward_mean": 0.25,
        "rlhf_trainer_kl_nats": 0.5,
    }
    assert [r.outcome for r in progress.update_trainer(samples)] == ["rejected"]
    assert progress.update_trainer(samples) == []  # nothing new
    samples['rlhf_trainer_rounds_total{outcome="published"}'] = 2.0
    new = progress.update_trainer(samples)
    assert [(r.index, r.outcome, r.reward_mean) for r in new] == [
        (2, "published", 0.25),
        (3, "published", 0.25),
    ]
    progress.models = [
        ModelChange(
            "reward", "published", "v000003", "", 0, {"heldout_accuracy": 0.8, "ratings_applied": 120}
        )
    ]
    text = "\n".join(progress.lines())
    assert "v000002" in text and "<- serving" in text and "100.0%" in text
    assert "held-out accuracy 80.0% after 120 ratings" in text
    assert "PPO rounds 3 (gate passed 2, rejected 1)" in text


def test_display_redraws_on_a_terminal_and_throttles_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    display = demo.Display(tty)
    display.show(["a", "b"])
    display.show(["c", "d"])
    assert "\x1b[2F\x1b[J" in tty.getvalue() and tty.getvalue().endswith("c\nd\n")
    plain = io.StringIO()
    display = demo.Display(plain, every_s=3600)
    display.show(["x"])
    display.show(["y"])  # throttled
    display.show(["z"], force=True)
    assert plain.getvalue() == "x\n\nz\n\n"


def test_scrape_reads_prometheus_text():
    registry = CollectorRegistry()
    Counter("demo_test_rounds", "r", ["outcome"], registry=registry).labels("published").inc(2)
    Gauge("demo_test_gauge", "g", registry=registry).set(1.5)
    port = demo.free_port()
    server, thread = start_http_server(port, registry=registry)
    try:
        samples = demo.scrape(port)
    finally:
        server.shutdown()
        thread.join()
    assert samples['demo_test_rounds_total{outcome="published"}'] == 2.0
    assert samples["demo_test_gauge"] == 1.5
    assert demo.scrape(demo.free_port(), timeout_s=0.5) == {}


async def test_wait_serving_reports_a_service_that_exits(tmp_path):
    service = demo.Service(
        "broken",
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        demo.free_port(),
        demo.free_port(),
        "",
        tmp_path / "broken.log",
    )
    service.start({})
    with pytest.raises(demo.DemoError, match=r"(?s)broken exited with code 3.*boom"):
        await asyncio.wait_for(demo.wait_serving(service, time.monotonic() + 60, asyncio.Event()), 60)


async def test_wait_serving_times_out_and_service_stops(tmp_path):
    service = demo.Service(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        demo.free_port(),
        demo.free_port(),
        "",
        tmp_path / "sleeper.log",
    )
    service.start({})
    try:
        with pytest.raises(demo.DemoError, match="not SERVING in time"):
            await demo.wait_serving(service, time.monotonic() + 1.0, asyncio.Event())
    finally:
        service.terminate()
        service.proc.wait(timeout=30)
    assert service.exited() == -15


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
        "PPO rounds 4 (published 3), swaps 3, wall time 1.5 min" in text and "report: r/report.html" in text
    )


def test_demo_config_validation():
    with pytest.raises(ValueError, match="duration_s"):
        DemoConfig(duration_s=0)
    with pytest.raises(ValueError, match="baseline_answers and final_answers"):
        DemoConfig(final_answers=-1)
    flags = ["--baseline-answers", "150", "--final-answers", "120"]
    parsed = parse_config(DemoConfig, flags, {})
    assert (parsed.baseline_answers, parsed.final_answers) == (150, 120)


async def test_stopping_skips_services_never_started(tmp_path):
    # With --baseline-answers the trainer starts late; a Ctrl-C before then must not wait for it.
    never = demo.Service("trainer", ["true"], 1, 2, "", tmp_path / "t.log")
    assert not never.running() and never.exited() is None
    out = io.StringIO()
    run = demo.Demo(DemoConfig(run_dir=str(tmp_path), shutdown_timeout_s=600), out=out)
    await asyncio.wait_for(run._stop([never]), timeout=60)  # a hang guard: without the fix it waits 600 s
    assert out.getvalue() == ""  # nothing to stop, so nothing said
