"""The HTML report on synthetic runs (figures, verdict, files) and the `report` command on real topics."""

import json

import pytest

from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.sim import report
from rlhf_online.sim.report import ModelChange, Rated, Round, RunData, Served

T0 = 1_700_000_000_000


def synthetic_run(rates=(0.2, 0.45, 0.8), per_version: int = 120) -> RunData:
    """Three policy versions served one after the other, with exact thumbs-up rates, and a replayed rating."""
    data = RunData()
    t = T0
    for v, rate in enumerate(rates, start=1):
        version = f"v{v:06d}"
        if v > 1:
            metrics = {"reward_mean": 0.1 * v, "kl_per_response": 0.5 * v, "gate_improvement": 0.1}
            data.models.append(ModelChange("policy", "published", version, f"v{v - 1:06d}", t - 500, metrics))
        for i in range(per_version):
            rid = f"{version}-{i}"
            data.served.append(Served(rid, version, t))
            data.ratings.append(Rated(f"e-{rid}", rid, version, (i * 37 % 100) < rate * 100, t + 100))
            t += 1000
        accuracy = {
            "heldout_accuracy": 0.55 + 0.1 * v,
            "heldout_auc": 0.6 + 0.1 * v,
            "ratings_applied": 100.0 * v,
        }
        data.models.append(ModelChange("reward", "published", f"v{v:06d}", "", t, accuracy))
    data.ratings.append(data.ratings[0])  # a replayed rating counts once
    data.models.append(ModelChange("policy", "rolled_back", "v000002", "", t, {}))
    return data


def test_wilson_interval_and_z():
    lo, hi = report.wilson_interval(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert report.wilson_interval(0, 0) == (0.0, 1.0)
    assert report.two_proportion_z(20, 100, 80, 100) > 8
    assert report.two_proportion_z(0, 0, 1, 1) == 0.0


def test_version_rows_swaps_and_verdict():
    data = synthetic_run().dedup()
    rows = report.version_rows(data)
    assert [r.version for r in rows] == ["v000001", "v000002", "v000003"]
    assert [r.rated for r in rows] == [120, 120, 120]  # the replay was dropped
    assert [(f, t) for _, f, t in report.swaps(data)] == [("v000001", "v000002"), ("v000002", "v000003")]
    v = report.verdict(data)
    assert v.learning is True and "learning" in v.headline
    assert v.first["version"] == "v000001" and v.last["version"] == "v000003"
    assert v.first["ratings"] == 120 and v.last["up_rate"] > v.first["up_rate"]
    assert v.rounds == 2 and v.rounds_published == 2 and v.swaps == 2


def test_verdict_without_change_or_data():
    flat = report.verdict(synthetic_run(rates=(0.5, 0.5, 0.5), per_version=60).dedup())
    assert flat.learning is False and "No clear change" in flat.headline
    empty = report.verdict(RunData())
    assert empty.learning is None and "Not enough data" in empty.headline


def test_reward_points_and_fallbacks():
    data = synthetic_run().dedup()
    points = report.reward_points(data)
    assert [p["ratings"] for p in points] == [100.0, 200.0, 300.0]
    assert points[0]["accuracy"] == pytest.approx(0.65) and points[0]["majority"] is not None
    # Without a "ratings seen" figure the report counts the ratings published before the checkpoint.
    bare = RunData(
        ratings=data.ratings,
        models=[ModelChange("reward", "published", "v1", "", T0 + 10_500, {"accuracy": 0.7})],
    )
    assert report.reward_points(bare)[0]["ratings"] == 11  # ratings at T0 + 0.1s, 1.1s, ..., 10.1s
    # Rounds recorded by the demo win over the published versions' figures.
    rounds = [Round(1, T0, "rejected", 0.1, 0.2), Round(2, T0 + 1, "published", 0.3, 0.4)]
    assert report.round_points(RunData(models=data.models, rounds=rounds)) == rounds


def test_write_report_files(tmp_path):
    data = synthetic_run()
    data.rounds = [
        Round(1, T0, "rejected", 0.1, 0.2),
        Round(2, T0 + 1, "published", 0.3, 0.4),
        Round(3, T0 + 2, "failed", None, None),
    ]
    data.judged = [report.Judged(s.model_version, s.timestamp_ms, 0.3) for s in data.served]
    path = report.write_report(data, tmp_path / "out", title="synthetic <run>")
    html = path.read_text()
    for name, _, _ in report.PLOTS:
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f'src="{name}"' in html
    assert "synthetic &lt;run&gt;" in html and "The loop is learning" in html
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["learning"] is True and summary["rounds"] == 3 and summary["rounds_published"] == 1
    assert [v["ratings"] for v in summary["versions"]] == [120, 120, 120]


def test_write_report_with_no_data(tmp_path):
    path = report.write_report(RunData(), tmp_path)
    assert "Not enough data" in path.read_text()
    assert all((tmp_path / name).is_file() for name, _, _ in report.PLOTS)


def test_from_protos_and_outcomes(tmp_path):
    interaction = events_pb2.Interaction(response_id="r1", model_version="v000001", timestamp_ms=5)
    up = events_pb2.FeedbackEvent(
        event_id="e1", response_id="r1", rating=chat_pb2.THUMBS_UP, model_version="v000001", timestamp_ms=6
    )
    unspecified = events_pb2.FeedbackEvent(event_id="e2", response_id="r1", model_version="v000001")
    model = events_pb2.ModelEvent(
        kind=events_pb2.REWARD,
        action=events_pb2.PUBLISHED,
        version="v000002",
        metrics={"heldout_accuracy": 0.8},
        timestamp_ms=7,
    )
    data = report.from_protos([interaction], [up, unspecified], [model])
    assert data.served == [Served("r1", "v000001", 5)]
    assert data.ratings == [Rated("e1", "r1", "v000001", True, 6)]
    assert data.models[0].kind == "reward" and data.models[0].metrics == {"heldout_accuracy": 0.8}
    outcomes = tmp_path / "outcomes.jsonl"
    rows = [
        {"model_version": "v000001", "started_ms": 1, "p_up": 0.25},
        {"model_version": "", "started_ms": 2, "p_up": None},
    ]
    outcomes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.load_outcomes(outcomes) == [report.Judged("v000001", 1, 0.25)]
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(
        json.dumps({"index": 1, "timestamp_ms": 3, "outcome": "published", "reward_mean": 0.5}) + "\n"
    )
    assert report.load_rounds(rounds) == [Round(1, 3, "published", 0.5, None)]


@pytest.mark.kafka
def test_report_command_reads_topics(kafka_bootstrap, topics, tmp_path):
    from rlhf_online.broker.clients import make_producer

    data = synthetic_run(per_version=60)
    producer = make_producer(kafka_bootstrap, client_id="test-report")
    for s in data.served:
        message = events_pb2.Interaction(
            response_id=s.response_id, model_version=s.model_version, timestamp_ms=s.timestamp_ms
        )
        producer.send(topics.interactions, key=s.response_id.encode(), value=message.SerializeToString())
    for r in data.ratings:
        message = events_pb2.FeedbackEvent(
            event_id=r.event_id,
            response_id=r.response_id,
            model_version=r.model_version,
            rating=chat_pb2.THUMBS_UP if r.up else chat_pb2.THUMBS_DOWN,
            timestamp_ms=r.timestamp_ms,
        )
        producer.send(topics.feedback, key=r.response_id.encode(), value=message.SerializeToString())
    for m in data.models:
        message = events_pb2.ModelEvent(
            kind=events_pb2.POLICY if m.kind == "policy" else events_pb2.REWARD,
            version=m.version,
            action=events_pb2.PUBLISHED if m.action == "published" else events_pb2.ROLLED_BACK,
            metrics=m.metrics,
            timestamp_ms=m.timestamp_ms,
        )
        producer.send(topics.models, value=message.SerializeToString())
    producer.send(topics.models, value=b"\xff\xffnot a proto")  # skipped with a warning
    producer.flush()
    producer.close()
    argv = ["--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topics.prefix, "--out-dir", str(tmp_path)]
    assert report.main(argv, {}) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ratings"] == 180 and summary["served"] == 180 and summary["learning"] is True
