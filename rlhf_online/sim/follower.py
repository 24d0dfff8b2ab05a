"""Follows a run's models, rounds and canary topics in the background, so the demo's display shows what the
trainer and the reward service decided (versions published, every PPO round and its gate decision, canary
trials started and decided) as it happens, from their events rather than from their metrics.
"""

import logging
import threading

from rlhf_online.broker.clients import make_consumer, wait_for_partitions
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.sim import runlog
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)


class EventFollower(threading.Thread):
    """Reads ModelEvents (`topics.models`), RoundEvents (`topics.rounds`) and CanaryDecisions
    (`topics.canary`) from the beginning into records.

    A daemon thread with a consumer of its own (no group, nothing committed); `snapshot()` gives the model
    changes and rounds read so far, `trials()` the canary decisions. The display is a nicety: a failure here
    is logged and ends the thread, never the demo.
    """

    def __init__(self, bootstrap: str, topics: Topics, *, client_id: str = "rlhf-demo-display") -> None:
        super().__init__(name="event-follower", daemon=True)
        self.bootstrap, self.topics, self.client_id = bootstrap, topics, client_id
        self._models: list[runlog.ModelChange] = []
        self._rounds: list[runlog.Round] = []
        self._trials: list[runlog.Trial] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        consumer = make_consumer(self.bootstrap, group_id=None, client_id=self.client_id)
        try:
            partitions = []
            for topic in (self.topics.models, self.topics.rounds, self.topics.canary):
                partitions += wait_for_partitions(consumer, topic, stop=self._stop_event)
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            while not self._stop_event.is_set():
                for tp, records in consumer.poll(timeout_ms=500).items():
                    self._add(tp.topic, records)
        except Exception as e:
            t = self.topics
            log.warning("stopped following %s, %s and %s: %s", t.models, t.rounds, t.canary, e)
        finally:
            consumer.close()

    def _add(self, topic: str, records: list) -> None:
        """Parses a batch of `topic` into records and appends them."""
        if topic == self.topics.models:
            models = runlog.parse_records(records, events_pb2.ModelEvent, topic=topic)
            with self._lock:
                self._models += [runlog.model_change(m) for m in models]
        elif topic == self.topics.canary:
            decisions = runlog.parse_records(records, events_pb2.CanaryDecision, topic=topic)
            with self._lock:
                self._trials += [runlog.trial(d) for d in decisions]
        else:
            rounds = runlog.parse_records(records, events_pb2.RoundEvent, topic=topic)
            with self._lock:
                self._rounds += [runlog.round_record(r) for r in rounds]

    def snapshot(self) -> tuple[list[runlog.ModelChange], list[runlog.Round]]:
        """(model changes, rounds) read so far, each in topic order."""
        with self._lock:
            return list(self._models), list(self._rounds)

    def trials(self) -> list[runlog.Trial]:
        """The canary decisions read so far, in topic order (`Progress.on_events(..., trials=...)`)."""
        with self._lock:
            return list(self._trials)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
