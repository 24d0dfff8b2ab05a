"""The reward service: joins ratings with interactions from Kafka and keeps the reward model learning.

    service = create_service(RewardConfig(registry_dir=..., grpc_port=0, metrics_port=-1))
    service.start()                  # restores LATEST reward (or initialises one), gRPC health, consumer loop
    service.wait_until(lambda s: s.examples_applied >= 100, timeout_s=60)
    service.stop()                   # applies what waits, publishes a checkpoint, commits, exits

The loop (one thread; a kafka-python consumer is not thread-safe), per record:
1. parse it (a record that cannot be used goes to `rlhf.feedback.dlq`);
2. drop a rating whose event_id this lineage has seen or is holding (the one duplicate check);
3. join by response_id (`JoinBuffer`; partition p of both topics lands on the same consumer by range
   assignment) and admit each joined rating to the learner (`OnlineLearner`);
4. update the model every N examples or T seconds, evaluating the held-out window every few updates;
5. every K updates, checkpoint: apply what waits, make the dead letters durable, publish a reward version
   (model, applied event_ids, replay buffer, and the offsets below anything still buffered, from
   `OffsetBook`), commit exactly those offsets, announce it on `rlhf.models`.
A crash between two checkpoints replays from the last one: events it applied are skipped by event_id, the
others are applied once (promise 2).
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from rlhf_online import contract
from rlhf_online.broker.clients import make_consumer, make_producer, wait_for_partitions
from rlhf_online.contract import REWARD
from rlhf_online.health import HealthServer
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Manifest, Registry
from rlhf_online.reward import checkpoint, metrics
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.dead_letters import DeadLetterOutbox, source_topic
from rlhf_online.reward.join import FEEDBACK, INTERACTIONS, DeadLetter, JoinBuffer, JoinOutput
from rlhf_online.reward.learner import HELDOUT, TRAIN, OnlineLearner
from rlhf_online.reward.offsets import OffsetBook
from rlhf_online.reward.records import BadRecord, parse_feedback, parse_interaction
from rlhf_online.tls import server_credentials
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

_LAG_EVERY_S = 5.0
# Few records per poll: updates run between polls, and the group drops a consumer that does not poll within
# max_poll_interval_ms (5 min), which a big batch of updates on a busy CPU could exceed.
_MAX_POLL_RECORDS = 100


def create_service(config: RewardConfig) -> "RewardService":
    return RewardService(config)


class RewardService:
    """Owns the consumer loop, the learner and the health server; counters below are for tests and logs."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.registry = Registry(config.registry_dir)
        self.group_id = config.group_id or f"{config.topic_prefix}.reward"
        self.join = JoinBuffer(
            int(config.join_ttl_s * 1000), config.join_max_interactions, config.join_max_waiting
        )
        self.learner: OnlineLearner | None = None  # restored or initialised on start
        self.version: str | None = None  # last published (or restored) reward version
        self.offsets = OffsetBook()  # the restored lineage's, from start on
        self.grpc_port: int | None = None
        # Progress, for tests and the closing figures.
        self.records_consumed = 0
        self.examples_applied = 0  # trained + held-out, this process
        self.duplicates = 0
        self.checkpoints_published = 0
        self.eval_history: list[dict[str, float]] = []  # {"examples_seen", "updates", "accuracy", ...}
        self.latencies_s: deque[float] = deque(maxlen=100_000)  # rating timestamp -> end of its update
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._health: HealthServer | None = None
        self._consumer = self._producer = self._dlq = None
        self._dirty = False  # something happened since the last checkpoint
        self._updates_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._applied_at_checkpoint = 0
        self._recent_latencies: list[float] = []
        self._last_lag_at = 0.0

    @property
    def dead_letters(self) -> int:
        return self._dlq.sent if self._dlq is not None else 0

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Restores the reward lineage, subscribes, serves health, and starts the loop thread."""
        self.config.apply_torch_threads()
        credentials = server_credentials(self.config)  # bad TLS settings stop us before the model loads
        lineage = checkpoint.restore_or_init(self.registry, self.config)
        self.learner, self.version = lineage.learner, lineage.version
        self.offsets = OffsetBook(lineage.offsets)
        self._applied_at_checkpoint = len(self.learner.applied)
        self._connect()
        self._health = HealthServer(
            self.config.grpc_port, host=self.config.grpc_host, credentials=credentials
        )
        self.grpc_port = self._health.port
        self._thread = threading.Thread(target=self._run, name="reward-loop", daemon=True)
        self._thread.start()
        self._health.set_serving(True)
        log.info(
            "reward service started: version %s, group %s, gRPC health on port %d",
            self.version or "(new)",
            self.group_id,
            self.grpc_port,
        )

    def stop(self, timeout_s: float = 120.0) -> None:
        """Graceful shutdown: the loop applies what waits, publishes a checkpoint and commits, then exits."""
        if self._health is not None:
            self._health.set_serving(False)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.error("the reward loop did not finish within %.0fs", timeout_s)
        if self._health is not None:
            self._health.stop()
            self._health = None

    def wait_until(self, predicate: Callable[["RewardService"], bool], timeout_s: float) -> bool:
        """Waits until `predicate(self)` holds (checked after each loop step); False on timeout or failure."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None or (self._thread and not self._thread.is_alive()):
                    return predicate(self)
                self._cond.wait(timeout=min(left, 0.5))
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _connect(self) -> None:
        """Producer, and a consumer subscribed once it knows both topics' partitions: kafka-python 3.0 can
        otherwise join with no partitions of a just-created topic and, by a race, never rejoin."""
        c = self.config
        self._producer = make_producer(c.kafka_bootstrap, client_id=f"{c.client_id}-producer")
        self._dlq = DeadLetterOutbox(self._producer, self.topics)
        self._consumer = make_consumer(
            c.kafka_bootstrap,
            group_id=self.group_id,
            client_id=f"{c.client_id}-consumer",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=_MAX_POLL_RECORDS,
        )
        topics = [self.topics.interactions, self.topics.feedback]
        for topic in topics:
            wait_for_partitions(self._consumer, topic)  # raises, naming the fix, if the topic does not exist
        self._consumer.subscribe(topics, listener=_Rebalance(self))
        log.info("consuming %s", " + ".join(topics))

    def _close_clients(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception as e:
                log.warning("closing the consumer: %s", e)
        if self._producer is not None:
            try:
                self._producer.close(timeout=10)
            except Exception as e:
                log.warning("closing the producer: %s", e)

    # ---- the loop -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
            self._checkpoint(final=True)
        except BaseException as e:
            self.error = e
            log.exception("the reward loop failed; nothing after the last checkpoint is committed")
            if self._health is not None:
                self._health.set_serving(False)
        finally:
            self._close_clients()
            with self._cond:
                self._cond.notify_all()

    def _step(self) -> None:
        """One poll: each record, then the update and checkpoint it made due; then the gauges."""
        batches = self._consumer.poll(timeout_ms=100, max_records=_MAX_POLL_RECORDS)
        for tp, records in batches.items():
            for record in records:
                if self.offsets.owns(tp):  # skip records of a partition revoked during this poll
                    self._process(tp, record)
                    self._update_and_checkpoint_if_due()
        self._update_and_checkpoint_if_due()
        self._export_gauges()
        with self._cond:
            self._cond.notify_all()

    def _process(self, tp: TopicPartition, record) -> None:
        """One record: parse, drop a duplicate, join, admit; never raises (bad records are dead-lettered)."""
        self.records_consumed += 1
        metrics.RECORDS.labels(tp.topic).inc()
        self.offsets.read(tp, record.offset)
        self._dirty = True
        side = INTERACTIONS if tp.topic == self.topics.interactions else FEEDBACK
        try:
            out = self._join(side, tp.partition, record)
        except BadRecord as e:
            reason = str(e)
        except Exception as e:  # a bug must not stop the stream: keep the record for a person to look at
            log.exception("unexpected error on %s:%d@%d", tp.topic, tp.partition, record.offset)
            reason = f"internal error: {type(e).__name__}: {e}"
        else:
            self._absorb(tp.partition, out)
            return
        self._dlq.send(DeadLetter(side, tp.partition, record.offset, record.key, record.value, reason))

    def _join(self, side: str, partition: int, record) -> JoinOutput:
        """Parses the record and joins it; a rating this lineage has seen is counted and goes no further."""
        if side == INTERACTIONS:
            interaction = parse_interaction(record.value, record.timestamp)
            return self.join.add_interaction(partition, record.offset, interaction)
        feedback = parse_feedback(record.value, record.timestamp)
        if self.learner.seen(feedback.event_id) or self.join.is_waiting(feedback.event_id):
            self.duplicates += 1
            metrics.DUPLICATES.inc()
            return JoinOutput()
        return self.join.add_feedback(partition, record.offset, feedback, record.key, record.value)

    def _absorb(self, partition: int, out: JoinOutput) -> None:
        """Books what the join holds and let go of; admits the joined ratings; sends the dead letters.

        Held-out examples count as applied at once; a training one keeps its rating's offset uncommitted
        until an update applies it."""
        for place in out.held:
            self.offsets.hold(self._partition_of(place.side, partition), place.offset)
        for place in out.released:
            self.offsets.release(self._partition_of(place.side, partition), place.offset)
        ratings = self._partition_of(FEEDBACK, partition)
        for example, offset in zip(out.examples, out.rating_offsets, strict=True):
            split = self.learner.add(example)  # never None (a duplicate): `_join` dropped those
            if split == TRAIN:
                self.offsets.await_update(example.event_id, ratings, offset)
            elif split == HELDOUT:
                self.examples_applied += 1
            metrics.EXAMPLES.labels(split).inc()
        for dead in out.dead:
            self._dlq.send(dead)
        for event, n in self.join.counts.items():
            metrics.JOIN_EVENTS.labels(event).inc(n)
        self.join.counts.clear()

    def _partition_of(self, side: str, partition: int) -> TopicPartition:
        return TopicPartition(source_topic(self.topics, side), partition)

    def _export_gauges(self) -> None:
        metrics.JOIN_BUFFER.labels("interactions").set(self.join.n_interactions)
        metrics.JOIN_BUFFER.labels("feedback").set(self.join.n_waiting)
        if time.monotonic() - self._last_lag_at >= _LAG_EVERY_S:
            self._last_lag_at = time.monotonic()
            metrics.export_lag(self._consumer)

    # ---- updates and evaluation ---------------------------------------------------------------------------

    def _update_and_checkpoint_if_due(self) -> None:
        c = self.config
        if self.learner.due(c.update_every_examples, c.update_interval_s):
            self._update()
        if self._updates_since_checkpoint >= c.checkpoint_every_updates or (
            c.checkpoint_interval_s > 0
            and self._dirty
            and time.monotonic() - self._last_checkpoint_at >= c.checkpoint_interval_s
        ):
            self._checkpoint()

    def _update(self) -> None:
        """One update of the oldest waiting examples; releases their offsets and records their latency."""
        started = time.monotonic()
        result = self.learner.update(max_examples=self.config.update_every_examples)
        if result is None:
            return
        elapsed_s, now_ms = time.monotonic() - started, contract.now_ms()
        for ex in result.examples:
            self.offsets.updated(ex.event_id)
            latency = max(0.0, (now_ms - ex.timestamp_ms) / 1000)
            self.latencies_s.append(latency)
            self._recent_latencies.append(latency)
            metrics.RATING_TO_UPDATE.observe(latency)
        self.examples_applied += len(result.examples)
        self._updates_since_checkpoint += 1
        metrics.observe_update(result.stats, elapsed_s)
        log.debug("update %d: %s in %.2fs", self.learner.updates, result.stats, elapsed_s)
        if self.learner.updates % self.config.eval_every_updates == 0:
            self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        """Held-out accuracy, AUC, log-loss and n of the model now ({} with no held-out example yet)."""
        figures = self.learner.evaluate()
        if not figures:
            return {}
        seen, updates = len(self.learner.applied), self.learner.updates
        self.eval_history.append({"examples_seen": float(seen), "updates": float(updates), **figures})
        metrics.observe_heldout(figures)
        log.info(
            "held-out after %d ratings (%d updates): accuracy %.3f, AUC %.3f, log-loss %.3f on %d",
            *(seen, updates, figures["accuracy"], figures["auc"], figures["log_loss"], int(figures["n"])),
        )
        return figures

    def _heldout_now(self) -> dict[str, float]:
        """The last evaluation if the model has not changed since, else a new one."""
        last = self.eval_history[-1] if self.eval_history else {}
        seen, updates = float(len(self.learner.applied)), float(self.learner.updates)
        if (last.get("examples_seen"), last.get("updates")) == (seen, updates):
            return last
        return self._evaluate()

    # ---- checkpoints and offsets --------------------------------------------------------------------------

    def _checkpoint(self, final: bool = False) -> None:
        """Apply what waits, make dead letters durable, publish, then commit the offsets it includes."""
        if not self._dirty and not self.learner.pending:
            return
        started = time.monotonic()
        while self.learner.pending:  # the one drain: a checkpoint includes every example admitted so far
            self._update()
        self._dlq.flush()
        offsets = self.offsets.committable()
        manifest = checkpoint.publish_checkpoint(
            self.registry,
            self.learner,
            parent_version=self.version,
            offsets=offsets,
            metrics=checkpoint.figures(self.learner, self._heldout_now()),
            extra={"group_id": self.group_id, "topic_prefix": self.config.topic_prefix},
        )
        self.version = manifest.version
        self.offsets.published(offsets)
        self._commit(offsets)
        self._log_checkpoint(manifest, time.monotonic() - started, final)
        self._announce(manifest)
        if self.config.keep_versions > 0:
            self.registry.retain(REWARD, self.config.keep_versions)

    def _log_checkpoint(self, manifest: Manifest, elapsed_s: float, final: bool) -> None:
        """Metrics and one log line per checkpoint, with the rate and latency since the previous one."""
        applied = manifest.extra["applied_events"]
        new, self._applied_at_checkpoint = applied - self._applied_at_checkpoint, applied
        rate = new / max(time.monotonic() - self._last_checkpoint_at, 1e-9)
        recent, self._recent_latencies = sorted(self._recent_latencies), []
        latency = ""
        if recent:
            p50, p95 = recent[len(recent) // 2], recent[int(len(recent) * 0.95)]
            latency = f", rating-to-update p50 {p50:.2f}s p95 {p95:.2f}s"
        self.checkpoints_published += 1
        metrics.observe_checkpoint(manifest.version, elapsed_s, rate)
        log.info(
            "published reward %s: %d ratings applied (+%d, %.1f/s%s), %d updates%s",
            *(manifest.version, applied, new, rate, latency, manifest.extra["updates"]),
            " (shutdown)" if final else "",
        )
        self._dirty = False
        self._updates_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()

    def _commit(self, offsets: dict[str, int]) -> None:
        """Commits the checkpoint's offsets of the partitions this consumer owns."""
        owned = self.offsets.owned_offsets(offsets)
        if not owned:
            return
        try:
            self._consumer.commit(
                {TopicPartition(*p): OffsetAndMetadata(o, "", -1) for p, o in owned.items()}
            )
            metrics.COMMITTED.inc()
        except KafkaError as e:  # the checkpoint holds the offsets; a restart seeks to them
            log.warning(
                "offset commit failed after publishing %s (%s); the checkpoint has them", self.version, e
            )

    def _announce(self, manifest: Manifest) -> None:
        event = contract.model_event(
            REWARD,
            events_pb2.PUBLISHED,
            manifest.version,
            parent_version=manifest.parent_version,
            metrics=manifest.metrics,
        )
        try:
            key = contract.model_event_key(event)
            self._producer.send(self.topics.models, key=key, value=event.SerializeToString()).get(timeout=10)
        except KafkaError as e:  # the registry is the truth; the event only saves readers a poll
            log.warning("could not announce reward %s on %s: %s", manifest.version, self.topics.models, e)

    def _on_assigned(self, assigned) -> None:
        """Start each partition where the reward lineage's last checkpoint says."""
        for tp, offset in self.offsets.assign(assigned).items():
            self._consumer.seek(tp, offset)
        log.info(
            "assigned %s", ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(assigned)) or "nothing"
        )

    def _on_revoked(self, revoked) -> None:
        """Forget what was read and buffered there: the next owner replays it from the committed offsets."""
        self.offsets.revoke(revoked)
        dropped = self.join.drop_partitions({tp.partition for tp in revoked})
        if revoked:
            log.info(
                "revoked %d partitions; dropped %d buffered join entries (they replay)", len(revoked), dropped
            )


class _Rebalance(ConsumerRebalanceListener):
    """Runs inside poll() on the loop thread: drop revoked partitions' buffers, seek assigned ones."""

    def __init__(self, service: RewardService) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked) -> None:
        self.service._on_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.service._on_assigned(assigned)
