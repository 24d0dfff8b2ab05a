"""The demo's live progress block: what the users saw, what the services published and decided.

`Progress` holds the figures and renders them as lines; `Display` redraws those lines in place on a terminal
(or prints them now and then elsewhere). The figures come from three places:

- the simulated users' outcomes (answers served, ratings, thumbs-up rate per version);
- the events on the models and rounds topics (`EventFollower`): reward checkpoints and their held-out
  accuracy, policy versions published, every PPO round with its gate decision and reason;
- current state from the services' metrics: the swaps serving has made, the ratings the trainer waits on.
"""

import math
import shutil
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from rlhf_online.contract import POLICY, REWARD, RewardFigure
from rlhf_online.sim.runlog import OUTCOMES, PASSED, REJECTED, ModelChange, Round
from rlhf_online.sim.simulate import Outcome, Summary

# Current-state metrics the display reads (counters are shown as they are, never differenced).
INFERENCE_SWAPS = "rlhf_inference_swaps_total"
TRAINER_NEW_RATINGS = "rlhf_trainer_new_ratings"


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
    swaps: int | None = None  # inference's swap counter; None: not scraped yet
    waiting_ratings: int | None = None  # new ratings the trainer has seen since its last round

    def on_outcome(self, outcome: Outcome) -> None:
        self.summary.add(outcome)
        if outcome.model_version:
            self.serving = outcome.model_version
        if outcome.acknowledged:
            self.recent.append(outcome.rating == "up")

    def on_events(self, models: Sequence[ModelChange], rounds: Sequence[Round]) -> None:
        """Everything the event follower has read so far."""
        self.models, self.rounds = list(models), list(rounds)

    def on_metrics(self, inference: Mapping[str, float], trainer: Mapping[str, float]) -> None:
        """The services' current metrics; a service that did not answer ({}) leaves its figure as it was."""
        if INFERENCE_SWAPS in inference:
            self.swaps = int(inference[INFERENCE_SWAPS])
        if TRAINER_NEW_RATINGS in trainer:
            self.waiting_ratings = int(trainer[TRAINER_NEW_RATINGS])

    def lines(self) -> list[str]:
        out = self._header()
        for version, v in sorted(self.summary.versions.items())[-8:]:
            mark = "  <- serving" if version == self.serving else ""
            out.append(f"  {version:<10}{v.served:>8}{v.rated:>8}{_pct(v.up_rate):>9}{mark}")
        out += [self._reward_line(), *self._rounds_lines(), self._versions_line()]
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

    def _versions_line(self) -> str:
        published = sum(m.is_published(POLICY) for m in self.models)
        swaps = self.swaps if self.swaps is not None else max(len(self.summary.versions) - 1, 0)
        return f"policy versions published {published}   swaps in serving {swaps}"


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
