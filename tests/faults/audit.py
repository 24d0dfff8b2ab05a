"""The audit after a fault: the topics (and the registry, the reward checkpoint's applied events) read back
with independent readers and compared with what the load driver's clients were told.

Definitions (tests/faults/README.md):
- missing: a rating that got OK whose event is not where the promise puts it (the feedback topic, its
  Interaction in the interactions topic, the reward checkpoint's applied events);
- duplicated: an event stored more often than its attempts could explain (a client's retry or a second vote
  on another replica may store the same event id again, which collapses by event id downstream), or an event
  id applied twice by the reward model.
"""

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from rlhf_online.broker.clients import read_topic
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry
from rlhf_online.reward import checkpoint
from rlhf_online.topics import Topics
from tests.faults.load import RETRIED, Ledger

READ_TIMEOUT_S = 60.0


@dataclass
class Figures:
    """A scenario's figures: what the clients did and were told, what the audit read and found."""

    scenario: str
    ledger: Ledger
    audited: int = 0  # records (or applied event ids) read back
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def show(self) -> str:
        """Prints the figures (pytest -s, or -rA) and returns them as text."""
        chats, ratings = self.ledger.codes("chat"), self.ledger.codes("rating")
        lines = [
            f"[faults] {self.scenario}",
            f"  requests {chats.total() + ratings.total()}: chats {chats.total()} ({chats['OK']} OK), "
            f"rating attempts {ratings.total()} ({ratings['OK']} OK) for {len(self.ledger.ratings)} ratings "
            f"({self.ledger.unrated} answers unrated)",
            f"  errors by status: chats {_errors(chats)}, ratings {_errors(ratings)}",
            f"  audited {self.audited}, missing {len(self.missing)}, duplicated {len(self.duplicated)}",
            *(f"  {name}: {value}" for name, value in self.extra.items()),
        ]
        text = "\n".join(lines)
        print(text)
        return text

    def check(self) -> None:
        assert not self.missing, f"{self.scenario}: missing {self.missing[:5]}"
        assert not self.duplicated, f"{self.scenario}: duplicated {self.duplicated[:5]}"


class Timeline:
    """When each step of a scenario happened, in seconds since it began (for the figures)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.start))

    def __str__(self) -> str:
        return ", ".join(f"{what} {at:.1f}s" for what, at in self.marks)


def _errors(codes: Counter) -> dict[str, int]:
    return {code: n for code, n in sorted(codes.items()) if code != "OK"}


def feedback_counts(bootstrap: str, topics: Topics) -> Counter:
    """event_id -> records of it in the feedback topic."""
    records = read_topic(bootstrap, topics.feedback, timeout_s=READ_TIMEOUT_S)
    return Counter(events_pb2.FeedbackEvent.FromString(r.value).event_id for r in records)


def interaction_ids(bootstrap: str, topics: Topics) -> Counter:
    """response_id -> records of it in the interactions topic."""
    records = read_topic(bootstrap, topics.interactions, timeout_s=READ_TIMEOUT_S)
    return Counter(events_pb2.Interaction.FromString(r.value).response_id for r in records)


def dead_letter_reasons(bootstrap: str, topics: Topics) -> Counter:
    """The first words of each dead letter's reason ("expired", "evicted", ...) -> count."""
    records = read_topic(bootstrap, topics.dlq, timeout_s=READ_TIMEOUT_S)
    return Counter(events_pb2.DeadLetter.FromString(r.value).reason.split(":", 1)[0] for r in records)


def audit_feedback(figures: Figures, counts: Counter) -> None:
    """Every OK rating's event in the feedback topic; no event stored more often than attempts explain."""
    possible: Counter = Counter()  # event_id -> attempts that may have stored it (OK, or no answer in time)
    for r in figures.ledger.ratings:
        possible[r.event_id] += sum(code == "OK" or code in RETRIED for code in r.codes)
    ok_ids = {r.event_id for r in figures.ledger.ratings if r.ok}
    figures.audited += counts.total()
    figures.missing += [f"feedback {eid}" for eid in sorted(ok_ids) if not counts[eid]]
    figures.duplicated += [f"feedback {eid} x{n}" for eid, n in counts.items() if n > possible[eid]]
    figures.extra["copies (a retry or second vote stored again)"] = counts.total() - len(counts)
    figures.extra["never OK but stored (may count once)"] = len(set(counts) - ok_ids)


def audit_interactions(figures: Figures, counts: Counter) -> None:
    """Every OK rating's answer, and every answer a client got, has its Interaction in the topic.

    A process killed before the broker acknowledged an answer's Interaction left it in its outbox journal
    (inference/journal.py); the next process on that journal sends it. So this holds across SIGKILLs too,
    for ratings acknowledged by any process (tests/faults/README.md, scenario 1).
    """
    figures.audited += counts.total()
    lost = [r for r in figures.ledger.ratings if r.ok and not counts[r.response_id]]
    figures.missing += [
        f"interaction {r.response_id} ({r.served_by}'s, rating OK from {r.accepted_by})" for r in lost
    ]
    answered = {c.response_id for c in figures.ledger.chats if c.code == "OK"}
    unjoined = sorted(answered - set(counts))
    figures.missing += [f"interaction {rid} (answered, never stored)" for rid in unjoined]
    figures.extra["answers without an Interaction"] = len(unjoined)


def applied_events(registry: Registry) -> list[str]:
    """The event ids the latest reward checkpoint says its lineage applied, in order, duplicates kept."""
    latest = registry.latest("reward")
    return [] if latest is None else checkpoint.applied_event_ids(registry.verify("reward", latest))


async def wait_applied(registry, event_ids: set[str], timeout_s: float) -> None:
    """Until the latest reward checkpoint holds every one of `event_ids` (the registry is files: polled)."""
    deadline = time.monotonic() + timeout_s
    while not event_ids <= set(await asyncio.to_thread(applied_events, registry)):
        if time.monotonic() > deadline:
            missing = event_ids - set(applied_events(registry))
            raise TimeoutError(f"{len(missing)} acknowledged ratings not applied after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


def audit_applied(figures: Figures, applied: list[str]) -> None:
    """Every OK rating applied, each event id applied once."""
    figures.audited += len(applied)
    seen = Counter(applied)
    ok_ids = {r.event_id for r in figures.ledger.ratings if r.ok}
    figures.missing += [f"applied {eid}" for eid in sorted(ok_ids - set(seen))]
    figures.duplicated += [f"applied {eid} x{n}" for eid, n in seen.items() if n > 1]


def verify_all(registry: Registry, kind: str) -> list[str]:
    """Every version of `kind` verifies (raises CorruptVersion otherwise), and LATEST is one of them."""
    versions = registry.versions(kind)
    for version in versions:
        registry.verify(kind, version)
    latest = registry.latest(kind)
    assert latest in versions, f"LATEST of {kind} is {latest}, not one of {versions}"
    return versions
