"""Canary trials in the report and the demo's live view, on synthetic protos (no broker): CanaryDecisions
and CANARY/PROMOTED events into records (runlog), trial spans, swaps and the verdict (stats), the canary
plot and table (plots, page, summary) and the progress lines."""

import json

import pytest

from rlhf_online.contract import CANARY_SHARE, POLICY, model_event
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.sim import page, plots, report, runlog, stats
from rlhf_online.sim.progress import Progress
from rlhf_online.sim.runlog import PROMOTED, ROLLED_BACK, RunData
from rlhf_online.sim.simulate import Outcome
from tests.test_report import T0, feedback, interaction


def policy_event(action: int, version: str, parent: str, t: int, share: float | None = None):
    event = model_event(
        POLICY, action, version, parent_version=parent, metrics={CANARY_SHARE: share} if share else None
    )
    event.timestamp_ms = t  # model_event stamps now_ms(); the synthetic run has a clock of its own
    return event


def decision(stable: str, canary: str, outcome: int, started: int, decided: int, arms, **fields):
    """A CanaryDecision with the arms' (ratings, ups), the rates they make and bounds 0.2 either side."""
    (n_c, k_c), (n_s, k_s) = arms
    diff = k_c / n_c - k_s / n_s
    return events_pb2.CanaryDecision(
        stable_version=stable, canary_version=canary, outcome=outcome, canary_ratings=n_c, canary_ups=k_c,
        stable_ratings=n_s, stable_ups=k_s, canary_rate=k_c / n_c, stable_rate=k_s / n_s,
        difference=diff, lower=diff - 0.2, upper=diff + 0.2,
        started_ms=started, timestamp_ms=decided, alpha=0.05, margin=0.05,
        **fields,
    )  # fmt: skip


class Run:
    """Builds a run's messages on a clock of 1 s per answer, each rated 100 ms after it is served."""

    def __init__(self) -> None:
        self.t, self.n = T0, 0
        self.m = {"interactions": [], "feedback": [], "models": [], "rounds": [], "decisions": []}

    def answers(self, versions, ups) -> None:
        for version, up in zip(versions, ups, strict=True):
            rid = f"r{self.n}"
            self.m["interactions"].append(interaction(rid, version, self.t))
            self.m["feedback"].append(feedback(rid, version, up, self.t + 100))
            self.t, self.n = self.t + 1000, self.n + 1

    def trial(self, stable, canary, share, canary_ups, stable_ups, outcome, reason) -> None:
        """CANARY, then answers alternating stable / canary, then the CanaryDecision and the ModelEvent."""
        started = self.t
        self.m["models"].append(policy_event(events_pb2.CANARY, canary, stable, started, share))
        self.t += 10
        for c, s in zip(canary_ups, stable_ups, strict=True):
            self.answers([stable, canary], [s, c])
        arms = ((len(canary_ups), sum(canary_ups)), (len(stable_ups), sum(stable_ups)))
        code = "non_inferior" if outcome == events_pb2.CANARY_PROMOTED else "inferior"
        self.m["decisions"].append(
            decision(
                stable, canary, outcome, started, self.t, arms, code=code, reason=reason, canary_share=share
            )
        )
        if outcome == events_pb2.CANARY_PROMOTED:
            self.m["models"].append(policy_event(events_pb2.PROMOTED, canary, stable, self.t + 5))
        else:
            self.m["models"].append(policy_event(events_pb2.ROLLED_BACK, stable, "", self.t + 5))
        self.t += 1000

    def data(self) -> RunData:
        m = self.m
        return runlog.from_protos(m["interactions"], m["feedback"], m["models"], m["rounds"], m["decisions"])


def _ups(n: int, k: int) -> list[bool]:
    return [i < k for i in range(n)]


def two_trials() -> Run:
    """v000001 serves; v000002 (half the users) beats it and is promoted; v000003 (a quarter) is worse than
    v000002 and is rolled back; v000002 serves on."""
    run = Run()
    run.m["models"].append(policy_event(events_pb2.PUBLISHED, "v000001", "", T0 - 1))
    run.answers(["v000001"] * 60, _ups(60, 18))
    run.trial(
        "v000001", "v000002", 0.5, _ups(40, 24), _ups(40, 12), events_pb2.CANARY_PROMOTED, "not worse <by 5>"
    )
    run.answers(["v000002"] * 60, _ups(60, 36))
    run.trial("v000002", "v000003", 0.25, _ups(40, 4), _ups(40, 24), events_pb2.CANARY_ROLLED_BACK, "worse")
    run.answers(["v000002"] * 60, _ups(60, 36))
    return run


# ---------------------------------------------------------------------------------------------- runlog


def test_runlog_reads_canary_decisions_and_canary_events():
    data = two_trials().data()
    assert [(m.action, m.version) for m in data.models] == [
        (runlog.PUBLISHED, "v000001"),
        (runlog.CANARY, "v000002"),
        (PROMOTED, "v000002"),
        (runlog.CANARY, "v000003"),
        (ROLLED_BACK, "v000002"),
    ]
    assert data.models[1].is_canary and data.models[1].share == 0.5 and data.models[0].share is None
    first, second = data.trials
    assert (first.stable_version, first.canary_version, first.outcome, first.code) == (
        "v000001", "v000002", PROMOTED, "non_inferior",
    )  # fmt: skip
    assert (first.canary_ratings, first.canary_ups, first.stable_ratings, first.stable_ups) == (
        40,
        24,
        40,
        12,
    )
    assert first.canary_rate == 0.6 and first.stable_rate == 0.3 and first.ratings == 80
    assert first.reason == "not worse <by 5>" and first.canary_share == 0.5 and first.margin == 0.05
    assert (second.outcome, second.canary_share) == (ROLLED_BACK, 0.25)
    assert runlog.trial(events_pb2.CanaryDecision(outcome=9)).outcome == "unknown"
    assert data.dedup().trials == data.trials and data.t0() == T0 - 1


def test_parse_records_reads_canary_decisions_and_skips_garbage():
    class Record:
        def __init__(self, value: bytes) -> None:
            self.value, self.partition, self.offset = value, 0, 0

    good = decision("v1", "v2", events_pb2.CANARY_PROMOTED, 5, 9, ((10, 5), (10, 5)))
    records = [Record(b"\xff\xffnot a proto"), Record(good.SerializeToString())]
    (parsed,) = runlog.parse_records(records, events_pb2.CanaryDecision, topic="t.canary")
    assert runlog.trial(parsed).canary_version == "v2"
    assert dict(runlog.TOPIC_MESSAGES)["canary"] is events_pb2.CanaryDecision


# ----------------------------------------------------------------------------------------------- stats


def test_promoted_counts_as_live_and_canary_answers_are_no_swaps():
    data = two_trials().data().dedup()
    assert [(m.action, m.version) for m in stats.published(data, POLICY)] == [
        (runlog.PUBLISHED, "v000001"),
        (PROMOTED, "v000002"),
    ]
    # One swap (to the promoted canary), not one per answer of either arm during the trials.
    assert [(f, t) for _, f, t in stats.swaps(data)] == [("v000001", "v000002")]
    assert stats.not_live_versions(data) == {"v000003"}
    v = stats.verdict(data)
    assert (v.canary_trials, v.canary_promoted, v.canary_rolled_back, v.swaps) == (2, 1, 1, 1)
    # The last version is the one serving everyone at the end, not the rolled-back canary.
    assert v.first["version"] == "v000001" and v.last["version"] == "v000002"


def test_trial_spans_pair_events_with_decisions():
    data = two_trials().data().dedup()
    first, second = stats.trial_spans(data.models, data.trials)
    assert (first.canary, first.stable, first.share, first.outcome) == ("v000002", "v000001", 0.5, PROMOTED)
    assert first.decision == data.trials[0] and first.ended_ms == data.trials[0].timestamp_ms
    assert first.live_from_ms == first.ended_ms and second.live_from_ms is None
    ratings = stats.trial_ratings(data, first)
    assert len(ratings) == 80 and {r.model_version for r in ratings} == {"v000001", "v000002"}
    assert sum(r.up for r in ratings if r.model_version == "v000002") == 24
    assert stats.open_trial([first, second]) is None


def test_an_open_trial_and_a_decision_without_its_event():
    run = Run()
    run.answers(["v000001"] * 10, _ups(10, 5))
    run.m["models"].append(policy_event(events_pb2.CANARY, "v000002", "v000001", run.t, 0.5))
    run.answers(["v000001", "v000002"] * 5, [True, False] * 5)
    data = run.data().dedup()
    (span,) = stats.trial_spans(data.models)
    assert stats.open_trial([span]) == span and span.ended_ms is None and span.outcome == ""
    assert len(stats.trial_ratings(data, span)) == 10 and stats.swaps(data) == []
    assert stats.verdict(data, min_ratings=1).last is None  # only v000001 served everyone
    # A decision read without its CANARY event (a later --since-ms) is a trial of its own.
    alone = runlog.trial(decision("v1", "v2", events_pb2.CANARY_ROLLED_BACK, 5, 9, ((4, 1), (4, 3))))
    (span,) = stats.trial_spans([], [alone])
    assert (span.started_ms, span.ended_ms, span.outcome, span.decision) == (5, 9, ROLLED_BACK, alone)


# ------------------------------------------------------------------------------------------- the files


def test_report_draws_and_tabulates_the_trials(tmp_path):
    path = report.write_report(two_trials().data(), tmp_path)
    png = tmp_path / "canary_trials.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    html = path.read_text()
    assert "<h2>Canary trials</h2>" in html and 'src="canary_trials.png"' in html
    assert "not worse &lt;by 5&gt;" in html and "promoted (non_inferior)" in html
    assert "rolled_back (inferior)" in html and "24 / 40" in html and "+0.300 [+0.100, +0.500]" in html
    assert "<th>canary trials (promoted, rolled back)</th><th>2 (1, 1)</th>" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [t["outcome"] for t in summary["trials"]] == [PROMOTED, ROLLED_BACK]
    assert (summary["canary_trials"], summary["last"]["version"]) == (2, "v000002")


def test_canary_plot_without_trials_and_with_an_open_one(tmp_path):
    plots.plot_canary_trials(RunData(), tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"
    run = Run()
    run.m["models"].append(policy_event(events_pb2.CANARY, "v000002", "v000001", run.t, 0.5))
    data = run.data()
    plots.plot_canary_trials(data, tmp_path / "open.png")  # a trial with no rating yet: a note, no error
    assert (tmp_path / "open.png").read_bytes()[:4] == b"\x89PNG"
    table = page.trials_table(stats.trial_spans(data.models))
    assert "open" in table and "still running" in table
    assert "No canary trial" in page.trials_table([])


def test_cumulative_rates_with_wilson_bands():
    rates, lows, highs = plots.cumulative_rates([True, False, True, True])
    assert rates == pytest.approx([1.0, 0.5, 2 / 3, 0.75])
    assert (lows[1], highs[1]) == stats.wilson_interval(1, 2) and all(lo <= r <= hi for lo, r, hi in zip(
        lows, rates, highs, strict=True))  # fmt: skip


# ----------------------------------------------------------------------------------- the live progress


def _rate(shown: Progress, version: str, ups: int, n: int, at_ms: int) -> None:
    """`n` acknowledged ratings of `version` at `at_ms`, the first `ups` of them up."""
    for i in range(n):
        rating = "up" if i < ups else "down"
        outcome = Outcome(i, "u", "p", False, 0, model_version=version, rating=rating, acknowledged=True)
        shown.on_outcome(outcome, at_ms=at_ms)


def test_progress_shows_an_open_trial_then_the_decision():
    shown = Progress(duration_s=60, judge="lowercase")
    _rate(shown, "v000004", 10, 10, at_ms=500)  # before the trial: not counted in its arms
    _rate(shown, "v000005", 23, 37, at_ms=1500)
    _rate(shown, "v000004", 20, 41, at_ms=1500)
    canary = runlog.model_change(policy_event(events_pb2.CANARY, "v000005", "v000004", 1000, 0.5))
    shown.on_events([canary], [])
    text = "\n".join(shown.lines())
    assert "canary v000005 (50% of users) vs v000004: 37 ratings 62.2% vs 41 ratings 48.8%" in text
    marks = {line.split()[0]: line.split("<- ")[-1] for line in shown.lines() if "<- " in line}
    assert marks == {"v000004": "serving", "v000005": "canary"}  # the versions table, by arm
    assert "policy versions published 0 (+1 in a canary trial)   swaps in serving 0" in text  # no swap

    arms = ((37, 23), (41, 20))
    d = decision("v000004", "v000005", events_pb2.CANARY_PROMOTED, 1000, 2000, arms, reason="not worse")
    promoted = runlog.model_change(policy_event(events_pb2.PROMOTED, "v000005", "v000004", 2001))
    shown.on_events([canary, promoted], [], [runlog.trial(d)])
    text = "\n".join(shown.lines())
    assert "canary trials 1 (promoted 1); last: v000005 promoted against v000004\n  canary: not worse" in text
    assert "vs 41 ratings" not in text
    assert "policy versions published 1   swaps in serving 1" in text


def test_progress_without_the_decision_record_reads_the_ending_event():
    shown = Progress(duration_s=60, judge="lowercase")
    canary = runlog.model_change(policy_event(events_pb2.CANARY, "v000005", "v000004", 1000, 0.5))
    back = runlog.model_change(policy_event(events_pb2.ROLLED_BACK, "v000004", "v000003", 2000))
    shown.on_events([canary, back], [])
    assert "canary trials 1 (promoted 0); last: v000005 rolled_back against v000004" in shown.lines()
    assert not any(line.startswith("canary") for line in Progress(duration_s=1, judge="j").lines())
