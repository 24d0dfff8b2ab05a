"""An HTML report, with PNG plots, that shows at a glance whether the loop is learning.

    rlhf-online report --topic-prefix rlhf --out-dir runs/mine
    rlhf-online report --topic-prefix demo-20250101-120000 --outcomes-path runs/x/outcomes.jsonl

It reads the Kafka topics of one deployment (served answers, ratings, model versions, PPO rounds, canary
decisions; see
`rlhf_online.sim.runlog`) and, when given, the simulator's outcomes (the hidden judge's P(up) of every
answer), then writes into the output folder `report.html` (`sim.page`), one PNG per plot (`sim.plots`) and
`summary.json`: the verdict and closing figures (`sim.stats`), one row per version and one per canary
trial decided. Given a `sim.compare.Comparison`, the page also shows the first and the last version side by
side and every version's fluency, and summary.json holds the fluency figures under "fluency".
"""

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_online.config import parse_config
from rlhf_online.sim import page, plots, runlog, stats
from rlhf_online.sim.config import ReportConfig
from rlhf_online.sim.runlog import RunData
from rlhf_online.topics import Topics

if TYPE_CHECKING:  # sim.compare imports torch and transformers; writing a report needs neither
    from rlhf_online.sim.compare import Comparison

log = logging.getLogger(__name__)

PLOTS = plots.PLOTS  # (file name, caption, function) of each PNG the report writes


def summary(
    result: stats.Verdict, rows: Sequence[stats.VersionRow], spans: Sequence[stats.TrialSpan] = ()
) -> dict:
    """summary.json: the verdict's fields, one entry per version and one per canary trial decided."""
    versions = [
        {
            "version": r.version,
            "served": r.served,
            "ratings": r.rated,
            "up": r.up,
            "up_rate": r.up_rate,
            "judge_mean": r.judge_mean,
        }
        for r in rows
    ]
    trials = [asdict(s.decision) for s in spans if s.decision is not None]
    return {**asdict(result), "versions": versions, "trials": trials}


def write_report(
    data: RunData,
    out_dir: str | Path,
    *,
    title: str = "rlhf-online run",
    time_bin_s: float = 0.0,
    min_ratings: int = stats.MIN_RATINGS,
    notes: Sequence[str] = (),
    comparison: "Comparison | None" = None,
) -> Path:
    """Writes report.html, the PNGs and summary.json into `out_dir`; returns the path of report.html.

    `comparison` (from `sim.compare.compare_run`) adds the side-by-side and fluency tables, and "fluency".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data.dedup()
    plots.draw_all(data, out, plots.PlotOptions(time_bin_s=time_bin_s))
    result, rows = stats.verdict(data, min_ratings), stats.version_rows(data)
    spans = stats.trial_spans(data.models, data.trials)
    figures = summary(result, rows, spans)
    if comparison is not None:
        figures["fluency"] = comparison.fluency_json()
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    html = page.page(title, result, rows, data.rounds, min_ratings, notes, spans, comparison)
    (out / "report.html").write_text(html, encoding="utf-8")
    return out / "report.html"


def load(config: ReportConfig) -> RunData:
    """The run's records from the topics, with the judge's outcomes and the rounds file when given.

    Raises:
        TimeoutError: the broker did not answer or a topic does not exist.
    """
    data = runlog.load_from_kafka(
        config.kafka_bootstrap, Topics(config.topic_prefix), since_ms=config.since_ms
    )
    if config.outcomes_path:
        data.judged = runlog.load_outcomes(config.outcomes_path)
    if config.rounds_path:  # a run folder's copy, for topics past their retention
        data.rounds = [r for r in runlog.load_rounds(config.rounds_path) if r.timestamp_ms >= config.since_ms]
    return data


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(ReportConfig, argv, env, prog="rlhf-online report")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        data = load(config)
    except TimeoutError as e:
        print(f"rlhf-online report: {e}", file=sys.stderr)
        return 1
    out_dir = config.out_dir or f"runs/report-{time.strftime('%Y%m%d-%H%M%S')}"
    path = write_report(
        data, out_dir, title=config.title, time_bin_s=config.time_bin_s, min_ratings=config.min_ratings
    )
    print(path)
    return 0
