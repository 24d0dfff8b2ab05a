"""The report: records from protos (runlog), figures on hand-computed numbers (stats), the files it writes
(plots, page, summary) and the `report` command on topics filled through the real test broker."""

import json
import math

import pytest

from rlhf_online.contract import (
    POLICY,
    REWARD,
    RewardFigure,
    RoundFigure,
    model_event,
    model_event_key,
    round_event_key,
)
from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.sim import page, plots, report, runlog, stats
from rlhf_online.sim.runlog import Rated, RunData, Served

T0 = 1_700_000_000_000


# ----------------------------------------------------------------------------------- synthetic messages


def interaction(rid: str, version: str, t: int) -> events_pb2.Interaction:
    return events_pb2.Interaction(response_id=rid, model_version=version, timestamp_ms=t)


def feedback(rid: str, version: str, up: bool, t: int) -> events_pb2.FeedbackEvent:
    rating = chat_pb2.THUMBS_UP if up else chat_pb2.THUMBS_DOWN
    return events_pb2.FeedbackEvent(
        event_id=f"e-{rid}", response_id=rid, model_version=version, rating=rating, timestamp_ms=t
    )


def version_event(kind: str, version: str, t: int, metrics=None, action=events_pb2.PUBLISHED):
    event = model_event(kind, action, version, metrics=metrics)
    event.timestamp_ms = t  # model_event stamps now_ms(); the synthetic run has a clock of its own
    return event


def round_event(n: int, outcome: int, t: int, *, reward=None, kl=None, **fields) -> events_pb2.RoundEvent:
    metrics = {}
    if reward is not None:
        metrics[RoundFigure.REWARD_MEAN] = reward
    if kl is not None:
        metrics[RoundFigure.KL_PER_RESPONSE] = kl
    return events_pb2.RoundEvent(
        round=n, name=f"round-{n:06d}", outcome=outcome, timestamp_ms=t, metrics=metrics, **fields
    )


def gate_rounds(v: int, t: int) -> list[events_pb2.RoundEvent]:
    """Before version v: a round the gate rejects, then one it passes (rounds 2v-3 and 2v-2)."""
    previous, version = f"v{v - 1:06d}", f"v{v:06d}"
    rejected = round_event(
        2 * v - 3, events_pb2.REJECTED, t - 900, reward=0.05, kl=2.0, start_version=previous,
        gate_code="no_improvement", gate_reason="candidate <no better> than serving",
    )  # fmt: skip
    passed = round_event(
        2 * v - 2, events_pb2.PASSED, t - 600, reward=0.1 * v, kl=0.5 * v, start_version=previous,
        published_version=version, gate_code="passed",
    )  # fmt: skip
    return [rejected, passed]


def synthetic_messages(rates=(0.2, 0.45, 0.8), per_version: int = 100) -> dict[str, list]:
    """Three policy versions served one after the other with exact thumbs-up rates (the first `rate * 100`
    of every 100 answers are rated up), a reward checkpoint after each, a rejected round between passed ones,
    a failed round, a replayed rating and a rollback."""
    out = {"interactions": [], "feedback": [], "models": [], "rounds": []}
    t = T0
    for v, rate in enumerate(rates, start=1):
        version = f"v{v:06d}"
        if v > 1:
            out["rounds"] += gate_rounds(v, t)
            out["models"].append(version_event(POLICY, version, t - 500, {RoundFigure.REWARD_MEAN: 0.1 * v}))
        for i in range(per_version):
            rid = f"{version}-{i}"
            out["interactions"].append(interaction(rid, version, t))
            out["feedback"].append(feedback(rid, version, i % 100 < round(rate * 100), t + 100))
            t += 1000
        figures = {
            RewardFigure.HELDOUT_ACCURACY: 0.55 + 0.1 * v,
            RewardFigure.HELDOUT_AUC: 0.6 + 0.1 * v,
            RewardFigure.RATINGS_APPLIED: 100.0 * v,
        }
        out["models"].append(version_event(REWARD, f"v{v:06d}", t, figures))
    out["rounds"].append(
        round_event(99, events_pb2.FAILED, t, gate_code="error", gate_reason="CUDA out of memory")
    )
    out["feedback"].append(out["feedback"][0])  # a replayed rating counts once
    out["models"].append(version_event(POLICY, "v000002", t + 1, action=events_pb2.ROLLED_BACK))
    return out


def synthetic_run(**kwargs) -> RunData:
    m = synthetic_messages(**kwargs)
    return runlog.from_protos(m["interactions"], m["feedback"], m["models"], m["rounds"])


# ---------------------------------------------------------------------------------------------- runlog


def test_records_from_protos_read_the_contract_names():
    data = runlog.from_protos(
        [interaction("r1", "v000001", 5)],
        [feedback("r1", "v000001", True, 6), events_pb2.FeedbackEvent(event_id="e2", response_id="r1")],
        [version_event(REWARD, "v000002", 7, {RewardFigure.HELDOUT_ACCURACY: 0.8})],
        [round_event(3, events_pb2.REJECTED, 8, reward=0.25, kl=float("nan"), gate_code="kl_too_large")],
    )
    assert data.served == [Served("r1", "v000001", 5)]
    assert data.ratings == [Rated("e-r1", "r1", "v000001", True, 6)]  # the unrated record is dropped
    change = data.models[0]
    assert (change.kind, change.action, change.version) == (REWARD, runlog.PUBLISHED, "v000002")
    assert change.figure(RewardFigure.HELDOUT_ACCURACY) == 0.8 and change.figure("accuracy") is None
    r = data.rounds[0]
    assert (r.round, r.name, r.outcome, r.gate_code) == (3, "round-000003", runlog.REJECTED, "kl_too_large")
    assert r.reward_mean == 0.25 and r.kl is None  # a NaN figure draws nothing
    unknown = runlog.round_record(events_pb2.RoundEvent(outcome=77))
    assert unknown.outcome == "unknown"
    assert data.t0() == 5 and RunData().t0() == 0


def test_dedup_drops_replays_and_orders_by_time():
    data = synthetic_run().dedup()
    assert len(data.ratings) == 300 and len({r.event_id for r in data.ratings}) == 300
    assert [r.name for r in data.rounds][:2] == ["round-000001", "round-000002"]
    assert all(a.timestamp_ms <= b.timestamp_ms for a, b in zip(data.models, data.models[1:], strict=False))


def test_rounds_and_outcomes_files_round_trip(tmp_path):
    rounds = synthetic_run().rounds
    runlog.save_rounds(rounds, tmp_path / "rounds.jsonl")
    assert runlog.load_rounds(tmp_path / "rounds.jsonl") == rounds
    outcomes = tmp_path / "outcomes.jsonl"
    rows = [
        {"model_version": "v000001", "started_ms": 1, "p_up": 0.25},
        {"model_version": "", "started_ms": 2, "p_up": None},  # an answer that failed: no judge
    ]
    outcomes.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert runlog.load_outcomes(outcomes) == [runlog.Judged("v000001", 1, 0.25)]


# ----------------------------------------------------------------------------------------------- stats


def test_wilson_interval_on_hand_computed_numbers():
    # k=50, n=100, z=1.96: centre 0.5, half-width 1.96 * sqrt(0.0025 + 0.00009604) / 1.038416 = 0.096170
    lo, hi = stats.wilson_interval(50, 100)
    assert lo == pytest.approx(0.403830, abs=1e-6) and hi == pytest.approx(0.596170, abs=1e-6)
    # k=0, n=10: centre = half = 0.19208 / 1.38416 = 0.138770, so the interval is [0, 0.277540]
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.277540, abs=1e-6)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # the interval always holds the observed rate (at k = n rounding once said no)
        assert stats.wilson_interval(n, n)[1] == 1.0 and stats.wilson_interval(0, n)[0] == 0.0


def test_two_proportion_z_on_hand_computed_numbers():
    # 20/100 -> 80/100: pooled 0.5, se = sqrt(0.25 * 0.02) = 0.0707107, z = 0.6 / se
    assert stats.two_proportion_z(20, 100, 80, 100) == pytest.approx(0.6 / math.sqrt(0.005))
    # 30/100 -> 45/100: pooled 0.375, se = sqrt(0.375 * 0.625 * 0.02) = 0.0684653
    assert stats.two_proportion_z(30, 100, 45, 100) == pytest.approx(2.190890, abs=1e-6)
    assert stats.two_proportion_z(0, 0, 1, 1) == 0.0 and stats.two_proportion_z(0, 5, 0, 5) == 0.0


@pytest.mark.parametrize(
    ("rates", "learning", "words"),
    [
        ((0.30, 0.45), True, "The loop is learning"),  # z = 2.19
        ((0.30, 0.40), False, "No clear change"),  # z = 1.48
        ((0.40, 0.20), False, "fell"),  # z = -3.09
    ],
)
def test_verdict_compares_the_first_and_last_version(rates, learning, words):
    v = stats.verdict(synthetic_run(rates=rates).dedup())
    assert v.learning is learning and words in v.headline
    assert v.first == {"version": "v000001", "up_rate": rates[0], "ratings": 100}
    assert v.last == {"version": "v000002", "up_rate": rates[1], "ratings": 100}


def test_version_rows_swaps_and_counts():
    data = synthetic_run().dedup()
    rows = stats.version_rows(data)
    assert [(r.version, r.served, r.rated, r.up) for r in rows] == [
        ("v000001", 100, 100, 20),
        ("v000002", 100, 100, 45),
        ("v000003", 100, 100, 80),
    ]
    assert [(f, t) for _, f, t in stats.swaps(data)] == [("v000001", "v000002"), ("v000002", "v000003")]
    v = stats.verdict(data)
    assert (v.rounds, v.rounds_published, v.rounds_rejected, v.swaps) == (5, 2, 2, 2)
    assert (v.served, v.ratings) == (300, 300)
    assert v.wall_time_s == pytest.approx(299.1)  # first answer at T0, last rating at T0 + 299.1 s
    empty = stats.verdict(RunData())
    assert empty.learning is None and "Not enough data" in empty.headline


def test_reward_points_read_the_reward_figures_only():
    data = synthetic_run().dedup()
    points = stats.reward_points(data)
    assert [p["ratings"] for p in points] == [100.0, 200.0, 300.0]
    assert [p["accuracy"] for p in points] == pytest.approx([0.65, 0.75, 0.85])
    # Majority baseline at the first checkpoint: 20 up of 100 ratings, so always "down" is right 80%.
    assert points[0]["majority"] == pytest.approx(0.8)
    # A checkpoint that names its figures otherwise is not guessed at.
    legacy = runlog.from_protos(model_events=[version_event(REWARD, "v1", T0, {"accuracy": 0.7, "seen": 5})])
    assert stats.reward_points(legacy) == []


# ------------------------------------------------------------------------------------------- the files


def test_write_report_files(tmp_path):
    data = synthetic_run()
    data.judged = [runlog.Judged(s.model_version, s.timestamp_ms, 0.3) for s in data.served]
    path = report.write_report(data, tmp_path / "out", title="synthetic <run>")
    html = path.read_text()
    for name, _, _ in report.PLOTS:
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f'src="{name}"' in html
    assert "synthetic &lt;run&gt;" in html and "The loop is learning" in html
    assert "candidate &lt;no better&gt; than serving" in html and "CUDA out of memory" in html
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["learning"] is True and summary["rounds"] == 5 and summary["rounds_published"] == 2
    assert summary["rounds_rejected"] == 2
    assert [v["ratings"] for v in summary["versions"]] == [100, 100, 100]


def test_write_report_with_no_data(tmp_path):
    path = report.write_report(RunData(), tmp_path)
    assert "Not enough data" in path.read_text() and "No PPO round" in path.read_text()
    assert "No canary trial" in path.read_text()
    assert all((tmp_path / name).is_file() for name, _, _ in report.PLOTS)


def test_rounds_table_shows_the_last_rounds():
    rounds = [runlog.round_record(round_event(n, events_pb2.PASSED, n)) for n in range(1, 61)]
    table = page.rounds_table(rounds)
    assert f"The last {page.MAX_ROUND_ROWS} of 60 rounds" in table
    assert "round-000060" in table and "round-000011" in table and "round-000010<" not in table


def test_ppo_plot_draws_rounds_without_figures(tmp_path):
    only_failed = RunData(rounds=[runlog.round_record(round_event(1, events_pb2.FAILED, T0))])
    plots.plot_ppo_rounds(only_failed, tmp_path / "ppo.png")
    assert (tmp_path / "ppo.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------ the command, on Kafka


def _fill(producer, topics, messages: dict[str, list]) -> None:
    keys = {
        "interactions": lambda m: m.response_id.encode(),
        "feedback": lambda m: m.response_id.encode(),
        "models": model_event_key,
        "rounds": lambda m: round_event_key(),
    }
    for attr, batch in messages.items():
        for message in batch:
            producer.send(getattr(topics, attr), key=keys[attr](message), value=message.SerializeToString())


@pytest.mark.kafka
def test_report_command_reads_the_four_topics(kafka_bootstrap, topics, tmp_path):
    from rlhf_online.broker.clients import make_producer

    producer = make_producer(kafka_bootstrap, client_id="test-report")
    _fill(producer, topics, synthetic_messages(per_version=60))
    producer.send(topics.rounds, value=b"\xff\xffnot a proto")  # skipped with a warning
    producer.flush()
    producer.close()
    argv = ["--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topics.prefix, "--out-dir", str(tmp_path)]
    assert report.main(argv, {}) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["ratings"], summary["served"], summary["learning"]) == (180, 180, True)
    assert (summary["rounds"], summary["rounds_published"], summary["rounds_rejected"]) == (5, 2, 2)
    assert "CUDA out of memory" in (tmp_path / "report.html").read_text()
    # A saved rounds file stands in for the rounds topic.
    runlog.save_rounds(synthetic_run().rounds[:1], tmp_path / "rounds.jsonl")
    argv += ["--rounds-path", str(tmp_path / "rounds.jsonl"), "--out-dir", str(tmp_path / "from-file")]
    assert report.main(argv, {}) == 0
    assert json.loads((tmp_path / "from-file" / "summary.json").read_text())["rounds"] == 1
