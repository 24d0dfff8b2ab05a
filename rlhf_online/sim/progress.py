"""The demo's live progress block: what the users saw, what the services published and decided.

`Progress` holds the figures and renders them as lines; `Display` redraws those lines in place on a terminal
(or prints them now and then elsewhere). The figures come from three places:

- the simulated users' outcomes (answers served, ratings, thumbs-up rate per version, and each arm's
  ratings while a canary trial runs);
- the events on the models, rounds and canary topics (`EventFollower`): reward checkpoints and their held-out
  accuracy, policy versions live (published, or promoted canaries), every PPO round with its gate decision
  and reason, canary trials started and decided;
- current state from the services' metrics: the swaps serving has made, the ratings the trainer waits on.
"""

import math
import shutil
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from rlhf_online.contract import POLICY, REWARD, RewardFigure, now_ms
from rlhf_online.sim import stats
from rlhf_online.sim.runlog import OUTCOMES, PASSED, PROMOTED, REJECTED, ModelChange, Round, Trial
from rlhf_online.sim.simulate import Outcome, Summary

# Current-state metrics the display reads (counters are shown as they are, never differenced).
INFERENCE_SWAPS = "rlhf_inference_swaps_total"
TRAINER_NEW_RATINGS = "rlhf_trainer_new_ratings"
MAX_KEPT_RATINGS = 100_000  # (time, version, up) of the latest ratings, for a canary trial's arms


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


@dataclass
class Progress:
    """What the terminal shows: the simulator's counters, the topics' events, two current-state metrics."""

    duration_s: float
    judge: str
    phase: str = "learning"  # or "baseline" / "final evaluation" (see --baseline-answers, --final-answers)
    started: float = field(default_factory=time.monotonic)
    summary: Summary = field(default_factory=Summary)
    recent: deque = field(default_factory=lambda: deque(maxlen=100))  # last ratings, True = up
    serving: str = ""  # the version of the latest answer
    models: list[ModelChange] = field(default_factory=list)  # from the models topic, in order
    rounds: list[Round] = field(default_factory=list)  # from the rounds topic, in order
    trials: list[Trial] = field(default_factory=list)  # canary decisions, from the canary topic, in order
    rated: deque = field(default_factory=lambda: deque(maxlen=MAX_KEPT_RATINGS))  # (ms, version, up)
    swaps: int | None = None  # inference's swap counter; None: not scraped yet
    waiting_ratings: int | None = None  # new ratings the trainer has seen since its last round

    def on_outcome(self, outcome: Outcome, at_ms: int | None = None) -> None:
        """One simulated request's outcome; a rating counts as given `at_ms` (default: now, just after
        SubmitFeedback acknowledged it)."""
        self.summary.add(outcome)
        if outcome.model_version:
            self.serving = outcome.model_version
        if outcome.acknowledged:
            self.recent.append(outcome.rating == "up")
            ms = now_ms() if at_ms is None else at_ms
            self.rated.append((ms, outcome.model_version, outcome.rating == "up"))

    def on_events(
        self, models: Sequence[ModelChange], rounds: Sequence[Round], trials: Sequence[Trial] | None = None
    ) -> None:
        """Everything the event follower has read so far; `trials` None leaves the decisions as they were."""
        self.models, self.rounds = list(models), list(rounds)
        if trials is not None:
            self.trials = list(trials)

    def on_metrics(self, inference: Mapping[str, float], trainer: Mapping[str, float]) -> None:
        """The services' current metrics; a service that did not answer ({}) leaves its figure as it was."""
        if INFERENCE_SWAPS in inference:
            self.swaps = int(inference[INFERENCE_SWAPS])
        if TRAINER_NEW_RATINGS in trainer:
            self.waiting_ratings = int(trainer[TRAINER_NEW_RATINGS])

    def lines(self) -> list[str]:
        out = self._header()
        trial = stats.open_trial(stats.trial_spans(self.models, self.trials))
        serving = trial.stable if trial else self.serving  # the latest answer may be the canary's
        for version, v in sorted(self.summary.versions.items())[-8:]:
            mark = "  <- canary" if trial and version == trial.canary else ""
            mark = "  <- serving" if version == serving else mark
            out.append(f"  {version:<10}{v.served:>8}{v.rated:>8}{_pct(v.up_rate):>9}{mark}")
        out += [self._reward_line(), *self._rounds_lines(), *self._canary_lines(), self._versions_line()]
        return out

    def _header(self) -> list[str]:
        s, elapsed = self.summary, time.monotonic() - self.started
        errors = sum(s.errors.values())
        recent = f"{sum(self.recent) / len(self.recent):.0%}" if self.recent else "-"
        return [
            f"rlhf-online demo  {_clock(elapsed)} / {_clock(self.duration_s)}   judge: {self.judge}   "
            f"phase: {self.phase}",
            f"answers served {s.requests - errors:>6}   ratings {s.rated:>6}   errors {errors:>4}   "
            f"thumbs up over the last {len(self.recent)} ratings: {recent}",
            f"  {'version':<10}{'served':>8}{'rated':>8}{'up rate':>9}",
        ]

    def _reward_line(self) -> str:
        rewards = [m for m in self.models if m.is_published(REWARD)]
        if not rewards:
            return "reward model: no checkpoint yet"
        last = rewards[-1]
        applied = last.figure(RewardFigure.RATINGS_APPLIED)
        after = f" after {int(applied)} ratings" if applied is not None else ""
        accuracy = _pct(last.figure(RewardFigure.HELDOUT_ACCURACY))
        return (
            f"reward model: {last.version}, held-out accuracy {accuracy}{after} ({len(rewards)} checkpoints)"
        )

    def _rounds_lines(self) -> list[str]:
        """The rounds so far by outcome, and the last round's figures and gate reason."""
        if not self.rounds:
            waiting = f" ({self.waiting_ratings} new ratings)" if self.waiting_ratings is not None else ""
            return [f"PPO: no round yet{waiting}"]
        counts = {o: sum(r.outcome == o for r in self.rounds) for o in OUTCOMES}
        others = "".join(f", {o} {n}" for o, n in counts.items() if n and o not in (PASSED, REJECTED))
        last = self.rounds[-1]
        figures = f", reward {last.reward_mean:.3f}" if last.reward_mean is not None else ""
        figures += f", KL {last.kl:.2f}" if last.kl is not None else ""
        lines = [
            f"PPO rounds {len(self.rounds)} (gate passed {counts[PASSED]}, rejected {counts[REJECTED]}"
            f"{others}); last: {last.name or last.round} {last.outcome}{figures}"
        ]
        if last.gate_reason:
            lines.append(f"  gate: {last.gate_reason}")
        return lines

    def _arm(self, version: str, since_ms: int) -> str:
        """`<n> ratings <rate>` of `version` since `since_ms`, from the users' acknowledged ratings."""
        ups = [up for ms, v, up in self.rated if v == version and ms >= since_ms]
        return f"{len(ups)} ratings {_pct(sum(ups) / len(ups) if ups else None)}"

    def _canary_lines(self) -> list[str]:
        """While a trial runs, each arm's ratings so far; after one, the last decision and its reason."""
        spans = stats.trial_spans(self.models, self.trials)
        if not spans:
            return []
        span = stats.open_trial(spans)
        if span is not None:
            share = f" ({span.share:.0%} of users)" if span.share else ""
            canary, stable = self._arm(span.canary, span.started_ms), self._arm(span.stable, span.started_ms)
            return [f"canary {span.canary}{share} vs {span.stable}: {canary} vs {stable}"]
        last = spans[-1]
        promoted = sum(s.outcome == PROMOTED for s in spans)
        head = f"canary trials {len(spans)} (promoted {promoted}); last: {last.canary} {last.outcome}"
        lines = [f"{head} against {last.stable}"]
        if last.decision is not None:  # its reason has the figures
            lines.append(f"  canary: {last.decision.reason}")
        return lines

    def _versions_line(self) -> str:
        published = sum(m.is_published(POLICY) for m in self.models)
        spans = stats.trial_spans(self.models, self.trials)
        if self.swaps is not None:
            swaps = self.swaps
        else:  # a version serving only a canary's share is no swap
            not_live = {s.canary for s in spans if s.live_from_ms is None}
            swaps = max(len(set(self.summary.versions) - not_live) - 1, 0)
        in_trial = sum(s.ended_ms is None for s in spans)
        trialled = f" (+{in_trial} in a canary trial)" if in_trial else ""
        return f"policy versions published {published}{trialled}   swaps in serving {swaps}"


class Display:
    """Redraws the progress block in place on a terminal; elsewhere prints it every `every_s` seconds."""

    def __init__(self, out: TextIO, every_s: float = 15.0) -> None:
        self.out, self.every_s = out, every_s
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._drawn = 0
        self._last = -math.inf

    def show(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            width = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
            self.out.write("\n".join(line[:width] for line in lines) + "\n")
            self._drawn = len(lines)
        elif force or time.monotonic() - self._last >= self.every_s:
            self.out.write("\n".join(lines) + "\n\n")
            self._last = time.monotonic()
        self.out.flush()

    def say(self, message: str) -> None:
        """A line of its own above the live block."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(message + "\n")
        self.out.flush()
