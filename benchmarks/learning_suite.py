"""Does the loop learn what users prefer, whatever they prefer? One whole demo run per judge of a suite.

Each run is `rlhf-online demo` with the same budget (its phases: baseline answers of the base model, the
learning time, final answers of the last version), the same seed and a different hidden judge, on one
broker. After each run the topics are read back (`sim.runlog`) and one row is written per judge:

- base rate: thumbs-up rate of the first version (the base model) over its baseline ratings;
- last rate: the last version's rate over the final phase's ratings;
- rise in points with a 95% interval (the difference of two proportions, Wald);
- versions to +15: published versions until one's rate first beats the base by 15 points (at least
  `--min-ratings` ratings), or "-" if none did;
- KL: the last published version's KL to the reference on the gate's held-out prompts (nats per answer);
- AUC: the reward model's held-out AUC at its last checkpoint.

    .venv/bin/python benchmarks/learning_suite.py                       # tiny preset, its whole suite
    .venv/bin/python benchmarks/learning_suite.py --judges starts,ends --duration-s 240
    .venv/bin/python benchmarks/learning_suite.py --preset real --model-dir .rlhf/models/smollm2-135m

The table (markdown) goes to stdout and to `<out>/suite.md`; every run's folder (logs, report) is kept.
"""

import argparse
import datetime
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_online.broker.local import start_broker
from rlhf_online.contract import POLICY, REWARD, RewardFigure, RoundFigure
from rlhf_online.sim import runlog, stats
from rlhf_online.sim.preferences import REAL_TEXT_SUITE, TINY_SUITE
from rlhf_online.topics import Topics

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SuiteRow:
    """The figures of one judge's run."""

    judge: str
    base: stats.VersionRow | None
    last: stats.VersionRow | None
    versions_to_15: int | None
    kl: float | None
    auc: float | None
    rounds: int
    published: int
    wall_s: float

    def rise(self) -> tuple[float, float] | None:
        """(points, half-width of the 95% interval) of last - base."""
        if not (self.base and self.last and self.base.rated and self.last.rated):
            return None
        p1, p2 = self.base.up / self.base.rated, self.last.up / self.last.rated
        se = math.sqrt(p1 * (1 - p1) / self.base.rated + p2 * (1 - p2) / self.last.rated)
        return 100 * (p2 - p1), 100 * 1.96 * se


def versions_to_rise(rows: list[stats.VersionRow], points: float, min_ratings: int) -> int | None:
    """Index (in published versions after the base) of the first version beating the base by `points`."""
    rated = [r for r in rows if r.rated >= min_ratings]
    if not rated:
        return None
    base = rated[0].up / rated[0].rated
    for i, row in enumerate(rows[1:], start=1):
        if row.rated >= min_ratings and row.up / row.rated >= base + points / 100:
            return i
    return None


def summarise(judge: str, data: runlog.RunData, wall_s: float, min_ratings: int) -> SuiteRow:
    """One SuiteRow from a run's records."""
    data = data.dedup()
    rows = stats.version_rows(data)
    rated = [r for r in rows if r.rated >= min_ratings]
    policies, rewards = stats.published(data, POLICY), stats.published(data, REWARD)
    return SuiteRow(
        judge=judge,
        base=rated[0] if rated else None,
        last=rated[-1] if len(rated) > 1 else None,
        versions_to_15=versions_to_rise(rows, 15, min_ratings),
        kl=policies[-1].figure(RoundFigure.GATE_KL_TO_REFERENCE) if policies else None,
        auc=rewards[-1].figure(RewardFigure.HELDOUT_AUC) if rewards else None,
        rounds=len(data.rounds),
        published=len(policies),
        wall_s=wall_s,
    )


def run_one(args, judge: str, judge_args: str, bootstrap: str, out: Path) -> SuiteRow:
    """Runs the demo with `judge` and reads its topics back."""
    prefix = f"suite-{judge}-{int(time.time())}"
    command = [
        sys.executable, "-m", "rlhf_online.cli", "demo", "--judge", judge, "--judge-args", judge_args,
        "--kafka-bootstrap", bootstrap, "--topic-prefix", prefix, "--run-dir", str(out / judge),
        "--seed", str(args.seed), *(["--duration-s", str(args.duration_s)] if args.duration_s else []),
        *(["--model-dir", args.model_dir] if args.model_dir else []), *shlex.split(args.demo_args),
    ]  # fmt: skip
    started = time.monotonic()
    with open(out / f"{judge}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=REPO)
    wall = time.monotonic() - started
    return summarise(judge, runlog.load_from_kafka(bootstrap, Topics(prefix)), wall, args.min_ratings)


def _pct(row: stats.VersionRow | None) -> str:
    return f"{100 * row.up / row.rated:.1f}% ({row.rated})" if row and row.rated else "-"


def table(rows: list[SuiteRow]) -> str:
    """The markdown table of the suite."""
    lines = [
        "| judge | base rate (ratings) | last version (ratings) | rise, points (95% CI) | versions to +15 "
        "| KL to ref. | RM AUC | rounds / published | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rise = r.rise()
        lines.append(
            f"| {r.judge} | {_pct(r.base)} | {_pct(r.last)} | "
            + (f"{rise[0]:+.1f} ± {rise[1]:.1f}" if rise else "-")
            + f" | {r.versions_to_15 if r.versions_to_15 is not None else '-'} | "
            + (f"{r.kl:.2f}" if r.kl is not None else "-")
            + " | "
            + (f"{r.auc:.2f}" if r.auc is not None else "-")
            + f" | {r.rounds} / {r.published} | {r.wall_s / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "real"), default="tiny", help="which suite of judges")
    parser.add_argument("--model-dir", default="", help="model folder (the demo's default: the tiny preset)")
    parser.add_argument("--judges", default="", help="comma-separated subset of the suite")
    parser.add_argument("--duration-s", type=float, default=0.0, help="learning phase; 0: the demo's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-ratings", type=int, default=50, help="ratings a version needs to count")
    parser.add_argument("--demo-args", default="", help="extra flags for every demo run (shell words)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder of the runs; default runs/suite-<time>"
    )
    args = parser.parse_args()
    suite = TINY_SUITE if args.preset == "tiny" else REAL_TEXT_SUITE
    chosen = [j for j in args.judges.split(",") if j] or list(suite)
    out = args.out or REPO / "runs" / f"suite-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    bootstrap = start_broker(REPO / ".rlhf" / "kafka")
    rows = []
    for judge in chosen:
        rows.append(run_one(args, judge, suite.get(judge, ""), bootstrap, out))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = f"Learning suite, {datetime.date.today()}, preset {args.preset}\n\n{table(rows)}\n"
    (out / "suite.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
