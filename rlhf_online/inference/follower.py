"""Hot swap: follows the models topic and swaps each new policy version into the engine (promises 3, 4, 5).

Every replica reads every event (manual partition assignment, no consumer group). A version is loaded in this
thread while serving goes on; new requests start on it at once while rows already running finish on the
old one, so no request fails or mixes versions.
A version whose checksums do not verify, or that does not load, is refused and serving stays where it is.

Canary trials (docs/design.md): CANARY loads the version as a second resident model that serves the share
`metrics["canary_share"]` of new requests; PROMOTED makes it the stable model for all traffic (loaded then if
this replica did not have it, e.g. it started during the trial); PUBLISHED and ROLLED_BACK serve their version
for all traffic, which withdraws any canary. A replica that starts during a trial serves stable only.
"""

import logging
import threading
from collections.abc import Callable

from kafka import TopicPartition
from kafka.errors import KafkaError

from rlhf_online.broker.clients import make_consumer, wait_for_partitions
from rlhf_online.contract import CANARY_SHARE, POLICY
from rlhf_online.engine.engine import PolicyEngine
from rlhf_online.inference import metrics
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry, RegistryError

log = logging.getLogger(__name__)


class ModelFollower:
    """A thread that applies the policy events of the models topic to one engine."""

    def __init__(
        self,
        engine: PolicyEngine,
        registry: Registry,
        load_model: Callable,
        *,
        bootstrap: str,
        topic: str,
        client_id: str,
    ) -> None:
        self.engine, self.registry, self.load_model = engine, registry, load_model
        self.topic = topic
        self._consumer = make_consumer(bootstrap, group_id=None, client_id=client_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
        self._start_offsets: dict[TopicPartition, int] = {}
        self._apply_lock = threading.Lock()
        self._target: str | None = None  # the version last handed to the engine
        self.bad_records = 0  # records that are not a ModelEvent of a known kind, skipped

    def mark_start(self, timeout_s: float = 10.0) -> None:
        """Remembers where the topic ends now. Call it before reading LATEST, so no later event is missed."""
        partitions = self._partitions(timeout_s)
        self._consumer.assign(partitions)
        self._start_offsets = self._consumer.end_offsets(partitions)

    def start(self) -> None:
        self._target = self.engine.version
        for tp, offset in self._start_offsets.items():
            self._consumer.seek(tp, offset)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._consumer.close()

    def apply(self, event: events_pb2.ModelEvent) -> bool:
        """Loads and swaps in the event's version. True once that version serves or is about to; False if it
        was refused. Serialised: the follower thread and a Rollback call may both apply the same event, and
        concurrent `from_pretrained` calls are not thread-safe."""
        if event.kind != events_pb2.POLICY:
            return False
        with self._apply_lock:
            if event.action == events_pb2.CANARY:
                return self._start_canary(event)
            if event.action == events_pb2.PROMOTED and self.engine.promote_canary(event.version):
                self._target = event.version
                metrics.SWAPS.inc()  # the stable version changed, as in a swap
                log.info("canary %s promoted; it serves all new requests", event.version)
                return True
            if event.version == self._target:
                self.engine.end_canary()  # serving `version` for all traffic withdraws any canary
                return True
            model = self._load(event.version)
            if model is None:
                return False
            self.engine.swap(model, event.version)
            self._target = event.version
        metrics.SWAPS.inc()
        action = events_pb2.ModelAction.Name(event.action)
        log.info("policy %s loaded (%s); new requests start on it", event.version, action)
        return True

    def _start_canary(self, event: events_pb2.ModelEvent) -> bool:
        """Loads the CANARY event's version beside the stable one (the lock is held)."""
        share = event.metrics.get(CANARY_SHARE, 0.0)
        if not 0.0 < share < 1.0 or event.version == self._target:
            metrics.SWAP_FAILURES.inc()
            log.error(
                "refusing canary %.64s: its %s is %s (wanted in (0, 1)) or it is the stable version %s",
                event.version, CANARY_SHARE, share, self._target,
            )  # fmt: skip
            return False
        if self.engine.canary is not None and self.engine.canary[0] == event.version:
            return True
        model = self._load(event.version)
        if model is None:
            return False
        self.engine.start_canary(model, event.version, share)
        return True

    def _load(self, version: str):
        """The verified version's model, or None (logged and counted) when it cannot be served."""
        try:
            return self.load_model(self.registry.verify(POLICY, version))
        except (RegistryError, OSError, ValueError) as e:
            metrics.SWAP_FAILURES.inc()
            log.error("refusing policy %.64s: %.300s; still serving %s", version, e, self._target)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=500)
            except KafkaError as e:
                log.warning("reading %s failed, retrying: %s", self.topic, e)
                self._stop.wait(1.0)
                continue
            for records in batches.values():
                for record in records:
                    self._handle(record.value)

    def _handle(self, value: bytes | None) -> None:
        """Applies one record; one that is not a ModelEvent of a known kind (a tombstone, garbage, another
        topic's message) is skipped and counted."""
        try:
            event = events_pb2.ModelEvent.FromString(value)
        except Exception as e:  # DecodeError, or TypeError for a value None
            self._skip(f"not a ModelEvent: {e}")
            return
        if event.kind not in (events_pb2.POLICY, events_pb2.REWARD):
            self._skip(f"a ModelEvent of unknown kind {event.kind}")
            return
        try:
            self.apply(event)
        except Exception:  # a bug must not stop the follower: this replica would never swap again
            metrics.SWAP_FAILURES.inc()
            log.exception("applying policy %.64s failed; still serving %s", event.version, self._target)

    def _skip(self, problem: str) -> None:
        self.bad_records += 1
        metrics.FOLLOWER_BAD_RECORDS.inc()
        log.error("skipping a record on %s: %s", self.topic, problem)

    def _partitions(self, timeout_s: float) -> list[TopicPartition]:
        return wait_for_partitions(self._consumer, self.topic, timeout_s=timeout_s, stop=self._stop)
