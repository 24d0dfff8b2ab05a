"""The reward service: joins ratings with interactions from Kafka and keeps the reward model learning.

    service = create_service(RewardConfig(registry_dir=..., grpc_port=0, metrics_port=-1))
    service.start()                  # restores LATEST reward (or initialises one), gRPC health, consumer loop
    service.wait_until(lambda s: s.examples_applied >= 100, timeout_s=60)
    service.stop()                   # applies what waits, publishes a checkpoint, commits, exits

The loop (one thread; a kafka-python consumer is not thread-safe):
1. polls `rlhf.interactions` and `rlhf.feedback` (one consumer group, range assignment, so partition p of both
   topics lands on the same consumer); records that cannot be parsed go to `rlhf.feedback.dlq`;
2. joins them by response_id (`JoinBuffer`) and admits each joined rating once (`OnlineLearner`);
3. updates the model every N examples or T seconds, evaluating the held-out window every few updates;
4. every K updates: applies what waits, makes the dead letters durable, publishes a reward checkpoint
   (model, applied event_ids, replay buffer, offsets it includes), commits exactly those offsets, announces
   the version on `rlhf.models`. A crash between two checkpoints replays from the last one: events it
   applied are skipped by event_id, the others are applied once (promise 2).
"""

import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from rlhf_online.broker.clients import make_consumer, make_producer
from rlhf_online.health import HealthServer
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import CorruptVersion, Registry, RegistryError
from rlhf_online.reward import checkpoint, metrics
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.join import FEEDBACK, INTERACTIONS, DeadLetter, JoinBuffer
from rlhf_online.reward.learner import HELDOUT, LearnerSettings, OnlineLearner
from rlhf_online.reward.model import RewardModel, init_reward_model
from rlhf_online.reward.records import BadRecord, parse_feedback, parse_interaction
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

REWARD, POLICY = "reward", "policy"
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
        self.learner: OnlineLearner | None = None
        self.version: str | None = None  # last published (or restored) reward version
        self.grpc_port: int | None = None
        # Progress, for tests and the closing figures.
        self.records_consumed = 0
        self.examples_applied = 0  # trained + held-out, this process
        self.duplicates = 0
        self.dead_letters = 0
        self.checkpoints_published = 0
        self.eval_history: list[
            dict[str, float]
        ] = []  # {"examples_seen", "accuracy", "auc", "log_loss", ...}
        self.latencies_s: deque[float] = deque(maxlen=100_000)  # rating timestamp -> end of its update
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._health: HealthServer | None = None
        self._consumer = None
        self._producer = None
        self._offsets: dict[str, int] = {}  # "topic:partition" -> next offset, as of the last checkpoint
        self._owned: set[TopicPartition] = set()  # assigned to this consumer now
        self._next: dict[TopicPartition, int] = {}  # next offset to process, per partition processed since
        self._dlq_futures: list = []
        self._dirty = False  # something happened since the last checkpoint
        self._updates_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._applied_at_checkpoint = 0
        self._recent_latencies: list[float] = []
        self._last_lag_at = 0.0
        self._cond = threading.Condition()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Restores the reward lineage, serves health, subscribes, and starts the loop thread."""
        self.config.apply_torch_threads()
        self.learner = self._restore()
        self._health = HealthServer(self.config.grpc_port, host=self.config.grpc_host)
        self.grpc_port = self._health.port
        c = self.config
        self._producer = make_producer(c.kafka_bootstrap, client_id=f"{c.client_id}-producer")
        self._consumer = make_consumer(
            c.kafka_bootstrap,
            group_id=self.group_id,
            client_id=f"{c.client_id}-consumer",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=_MAX_POLL_RECORDS,
        )
        self._consumer.subscribe([self.topics.interactions, self.topics.feedback], listener=_Rebalance(self))
        self._thread = threading.Thread(target=self._run, name="reward-loop", daemon=True)
        self._thread.start()
        self._health.set_serving(True)
        log.info(
            "reward service started: version %s, %s + %s, group %s, gRPC health on port %d",
            self.version or "(new)",
            self.topics.interactions,
            self.topics.feedback,
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
        batches = self._consumer.poll(timeout_ms=100, max_records=_MAX_POLL_RECORDS)
        for tp, records in batches.items():
            for record in records:
                if tp in self._owned:  # skip records of a partition revoked during this poll
                    self._process(tp, record)
                    self._update_if_due()
                    self._checkpoint_if_due()
        self._update_if_due()
        self._checkpoint_if_due()
        if time.monotonic() - self._last_lag_at >= _LAG_EVERY_S:
            self._export_lag()
        metrics.JOIN_BUFFER.labels("interactions").set(self.join.n_interactions)
        metrics.JOIN_BUFFER.labels("feedback").set(self.join.n_waiting)
        with self._cond:
            self._cond.notify_all()

    def _process(self, tp: TopicPartition, record) -> None:
        """One record: parse, join, admit; never raises (a record that cannot be used is dead-lettered)."""
        self.records_consumed += 1
        metrics.RECORDS.labels(tp.topic).inc()
        self._next[tp] = record.offset + 1
        self._dirty = True
        side = INTERACTIONS if tp.topic == self.topics.interactions else FEEDBACK
        try:
            if side == INTERACTIONS:
                out = self.join.add_interaction(tp.partition, record.offset, parse_interaction(record.value))
            else:
                feedback = parse_feedback(record.value)
                if self.learner.seen(feedback.event_id) or self.join.is_waiting(feedback.event_id):
                    self._count_duplicate()
                    return
                out = self.join.add_feedback(tp.partition, record.offset, feedback, record.key, record.value)
        except BadRecord as e:
            self._dead_letter(DeadLetter(side, tp.partition, record.offset, record.key, record.value, str(e)))
            return
        except Exception as e:  # a bug must not stop the stream: keep the record for a person to look at
            log.exception("unexpected error on %s:%d@%d", tp.topic, tp.partition, record.offset)
            reason = f"internal error: {type(e).__name__}: {e}"
            self._dead_letter(DeadLetter(side, tp.partition, record.offset, record.key, record.value, reason))
            return
        for example in out.examples:
            split = self.learner.add(example)
            if split is None:
                self._count_duplicate()
                continue
            metrics.EXAMPLES.labels(split).inc()
            if split == HELDOUT:
                self.examples_applied += 1
        for dead in out.dead:
            self._dead_letter(dead)
        for event, n in self.join.counts.items():
            if n:
                metrics.JOIN_EVENTS.labels(event).inc(n)
        self.join.counts.clear()

    def _checkpoint_if_due(self) -> None:
        c = self.config
        if self._updates_since_checkpoint >= c.checkpoint_every_updates or (
            c.checkpoint_interval_s > 0
            and self._dirty
            and time.monotonic() - self._last_checkpoint_at >= c.checkpoint_interval_s
        ):
            self._checkpoint()

    def _update_if_due(self) -> None:
        if self.learner.due(self.config.update_every_examples, self.config.update_interval_s):
            self._update()

    def _update(self) -> None:
        started = time.monotonic()
        result = self.learner.update(max_examples=self.config.update_every_examples)
        if result is None:
            return
        elapsed = time.monotonic() - started
        now_ms = time.time() * 1000
        for ex in result.examples:
            latency = max(0.0, (now_ms - ex.timestamp_ms) / 1000)
            self.latencies_s.append(latency)
            self._recent_latencies.append(latency)
            metrics.RATING_TO_UPDATE.observe(latency)
        self.examples_applied += len(result.examples)
        self._updates_since_checkpoint += 1
        metrics.UPDATES.inc()
        metrics.UPDATE_SECONDS.observe(elapsed)
        for part in ("loss", "pointwise_loss", "pairwise_loss"):
            if part in result.stats:
                metrics.LOSS.labels(part).set(result.stats[part])
        log.debug("update %d: %s in %.2fs", self.learner.updates, result.stats, elapsed)
        if self.learner.updates % self.config.eval_every_updates == 0:
            self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        figures = self.learner.evaluate()
        if not figures:
            return {}
        seen = len(self.learner.applied)
        self.eval_history.append(
            {"examples_seen": float(seen), "updates": float(self.learner.updates), **figures}
        )
        metrics.HELDOUT_ACCURACY.set(figures["accuracy"])
        metrics.HELDOUT_AUC.set(figures["auc"])
        metrics.HELDOUT_LOG_LOSS.set(figures["log_loss"])
        metrics.HELDOUT_SIZE.set(figures["n"])
        log.info(
            "held-out after %d ratings (%d updates): accuracy %.3f, AUC %.3f, log-loss %.3f on %d",
            seen,
            self.learner.updates,
            figures["accuracy"],
            figures["auc"],
            figures["log_loss"],
            int(figures["n"]),
        )
        return figures

    # ---- checkpoints and offsets --------------------------------------------------------------------------

    def _checkpoint(self, final: bool = False) -> None:
        """Apply what waits, make dead letters durable, publish, then commit the offsets it includes."""
        if not self._dirty and not self.learner.pending:
            return
        started = time.monotonic()
        while self.learner.pending:
            self._update()
        self._flush_dead_letters()
        offsets = self._committable()
        last = self.eval_history[-1] if self.eval_history else {}
        fresh = last.get("updates") == self.learner.updates and last.get("examples_seen") == len(
            self.learner.applied
        )
        figures = {k: last[k] for k in ("accuracy", "auc", "log_loss", "n")} if fresh else self._evaluate()
        manifest = checkpoint.publish_checkpoint(
            self.registry,
            self.learner,
            parent_version=self.version,
            offsets=offsets,
            metrics={
                **{f"heldout_{k}": v for k, v in figures.items()},
                "ratings_applied": float(len(self.learner.applied)),
                "updates": float(self.learner.updates),
            },
            extra={"group_id": self.group_id, "topic_prefix": self.config.topic_prefix},
        )
        self.version = manifest.version
        self._offsets = offsets
        self._commit(offsets)
        self.checkpoints_published += 1
        metrics.CHECKPOINTS.inc()
        metrics.CHECKPOINT_VERSION.set(int(manifest.version[1:]))
        metrics.CHECKPOINT_SECONDS.observe(time.monotonic() - started)
        self._log_checkpoint(manifest, final)
        self._dirty = False
        self._updates_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._announce(manifest)
        if self.config.keep_versions > 0:
            self.registry.retain(REWARD, self.config.keep_versions)

    def _log_checkpoint(self, manifest, final: bool) -> None:
        """One line per checkpoint, with the rate and rating-to-update latency since the previous one."""
        applied = manifest.extra["applied_events"]
        new = applied - self._applied_at_checkpoint
        rate = new / max(time.monotonic() - self._last_checkpoint_at, 1e-9)
        recent, self._recent_latencies = sorted(self._recent_latencies), []
        latency = ""
        if recent:
            p50, p95 = recent[len(recent) // 2], recent[int(len(recent) * 0.95)]
            latency = f", rating-to-update p50 {p50:.2f}s p95 {p95:.2f}s"
        metrics.EXAMPLES_PER_SECOND.set(rate)
        log.info(
            "published reward %s: %d ratings applied (+%d, %.1f/s%s), %d updates%s",
            manifest.version,
            applied,
            new,
            rate,
            latency,
            manifest.extra["updates"],
            " (shutdown)" if final else "",
        )
        self._applied_at_checkpoint = applied

    def _committable(self) -> dict[str, int]:
        """Per owned partition: the next offset to process, or lower if the join buffer still holds a record
        there. Partitions not owned now keep what the last checkpoint said."""
        offsets = dict(self._offsets)
        for tp, next_offset in self._next.items():
            side = INTERACTIONS if tp.topic == self.topics.interactions else FEEDBACK
            held = self.join.lowest_held_offset(side, tp.partition)
            offsets[checkpoint.offset_key(tp.topic, tp.partition)] = (
                next_offset if held is None else min(held, next_offset)
            )
        return offsets

    def _commit(self, offsets: dict[str, int]) -> None:
        owned = {}
        for key, offset in offsets.items():
            tp = TopicPartition(*checkpoint.parse_offset_key(key))
            if tp in self._owned:
                owned[tp] = OffsetAndMetadata(offset, "", -1)
        if not owned:
            return
        try:
            self._consumer.commit(owned)
            metrics.COMMITTED.inc()
        except KafkaError as e:  # the checkpoint holds the offsets; a restart seeks to them
            log.warning(
                "offset commit failed after publishing %s (%s); the checkpoint has them", self.version, e
            )

    def _seek_to_checkpoint(self, assigned) -> None:
        """On assignment: start each partition where the reward lineage's last checkpoint says."""
        for tp in assigned:
            offset = self._offsets.get(checkpoint.offset_key(tp.topic, tp.partition))
            if offset is not None:
                self._consumer.seek(tp, offset)
        self._owned |= set(assigned)
        log.info(
            "assigned %s", ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(assigned)) or "nothing"
        )

    def _drop_revoked(self, revoked) -> None:
        dropped = self.join.drop_partitions({tp.partition for tp in revoked})
        for tp in revoked:
            self._next.pop(tp, None)
            self._owned.discard(tp)
        if revoked:
            log.info(
                "revoked %d partitions; dropped %d buffered join entries (they replay)", len(revoked), dropped
            )

    def _announce(self, manifest) -> None:
        event = events_pb2.ModelEvent(
            kind=events_pb2.REWARD,
            version=manifest.version,
            parent_version=manifest.parent_version or "",
            action=events_pb2.PUBLISHED,
            path=f"{REWARD}/{manifest.version}",
            metrics=manifest.metrics,
            timestamp_ms=int(time.time() * 1000),
        )
        try:
            future = self._producer.send(
                self.topics.models, key=REWARD.encode(), value=event.SerializeToString()
            )
            future.get(timeout=10)
        except KafkaError as e:  # the registry is the truth; the event only saves readers a poll
            log.warning("could not announce reward %s on %s: %s", manifest.version, self.topics.models, e)

    # ---- dead letters -------------------------------------------------------------------------------------

    def _dead_letter(self, dead: DeadLetter) -> None:
        topic = self.topics.interactions if dead.side == INTERACTIONS else self.topics.feedback
        msg = events_pb2.DeadLetter(
            source_topic=topic,
            partition=dead.partition,
            offset=dead.offset,
            key=dead.key or b"",
            value=dead.value or b"",
            reason=dead.reason,
            timestamp_ms=int(time.time() * 1000),
        )
        self._dlq_futures.append(
            self._producer.send(self.topics.dlq, key=dead.key, value=msg.SerializeToString())
        )
        self.dead_letters += 1
        metrics.DLQ.labels(dead.reason.split(":", 1)[0]).inc()
        log.warning("dead-lettered %s:%d@%d: %s", topic, dead.partition, dead.offset, dead.reason)

    def _flush_dead_letters(self) -> None:
        """Blocks until the broker has every dead letter; raises if one was refused (no commit past it)."""
        if not self._dlq_futures:
            return
        self._producer.flush(timeout=30)
        futures, self._dlq_futures = self._dlq_futures, []
        failed = [f for f in futures if not f.succeeded()]
        if failed:
            metrics.DLQ_FAILURES.inc(len(failed))
            raise RuntimeError(
                f"{len(failed)} dead letters were not acknowledged by the broker ({failed[0].exception}); "
                "not committing offsets past them. Check the broker and restart the reward service."
            )

    # ---- helpers ------------------------------------------------------------------------------------------

    def _count_duplicate(self) -> None:
        self.duplicates += 1
        metrics.DUPLICATES.inc()

    def _export_lag(self) -> None:
        self._last_lag_at = time.monotonic()
        assigned = list(self._consumer.assignment())
        if not assigned:
            return
        try:
            ends = self._consumer.end_offsets(assigned)
            lag: dict[str, int] = {}
            for tp in assigned:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends[tp] - self._consumer.position(tp))
            for topic, n in lag.items():
                metrics.CONSUMER_LAG.labels(topic).set(n)
        except KafkaError as e:
            log.debug("consumer lag not available: %s", e)

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

    def _restore(self) -> OnlineLearner:
        """The newest reward version that verifies, else a new reward model from the base model."""
        c = self.config
        settings = LearnerSettings(
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm,
            trainable_layers=c.trainable_layers,
            replay_ratio=c.replay_ratio,
            replay_capacity=c.replay_capacity,
            steps_per_update=c.steps_per_update,
            micro_batch_size=c.micro_batch_size,
            pairwise_coef=c.pairwise_coef,
            class_weighting=c.class_weighting,
            heldout_fraction=c.heldout_fraction,
            heldout_window=c.heldout_window,
            seed=c.seed,
        )
        latest = self.registry.latest(REWARD)
        candidates = [latest] if latest else []
        candidates += [v for v in reversed(self.registry.versions(REWARD)) if latest and v < latest]
        for version in candidates:
            try:
                restored = checkpoint.restore(self.registry, version, device=c.torch_device())
            except (CorruptVersion, RegistryError) as e:
                log.error("reward %s cannot be loaded (%s); trying the version before it", version, e)
                continue
            restored.model.max_length = c.max_length
            learner = OnlineLearner(restored.model, settings, restored.state)
            checkpoint.load_optimizer_state(learner, restored.optimizer_state)
            self.version, self._offsets = version, restored.offsets
            self._applied_at_checkpoint = len(learner.applied)
            log.info(
                "resumed reward %s: %d ratings applied, %d updates, offsets %s",
                version,
                len(learner.applied),
                learner.updates,
                restored.offsets,
            )
            return learner
        model = self._init_model()
        return OnlineLearner(model, settings)

    def _init_model(self) -> RewardModel:
        if self.config.base_model_dir:
            return self._new_model(self.config.base_model_dir)
        for version in self.registry.versions(POLICY):  # the oldest policy: the lineage's base model
            try:
                base = self.registry.verify(POLICY, version)
            except RegistryError as e:
                log.warning("policy %s cannot be used as the reward base (%s)", version, e)
                continue
            return self._new_model(base)
        from rlhf_online.engine.tiny_model import write_tiny_model

        log.info("no --base-model-dir and no policy in the registry: starting from the tiny preset")
        with tempfile.TemporaryDirectory(prefix="rlhf-reward-base-") as tmp:
            write_tiny_model(Path(tmp), seed=self.config.seed)
            return self._new_model(tmp)

    def _new_model(self, base: str | Path) -> RewardModel:
        c = self.config
        return init_reward_model(
            base, max_length=c.max_length, seed=c.seed, device=c.torch_device(), layers=c.backbone_layers
        )


class _Rebalance(ConsumerRebalanceListener):
    """Runs inside poll() on the loop thread: drop revoked partitions' buffers, seek assigned ones."""

    def __init__(self, service: RewardService) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked) -> None:
        self.service._drop_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.service._seek_to_checkpoint(assigned)
