"""The trainer service: watches Kafka and the registry, runs PPO rounds, publishes gated policy versions.

    service = create_service(TrainerConfig(registry_dir=..., grpc_port=0, metrics_port=-1))
    service.start()          # gRPC health on service.grpc_port, a background loop
    ...
    service.stop()           # abandons a round in progress (nothing partial is ever published)

The loop (one thread; kafka-python consumers are not thread-safe):
1. polls `rlhf.interactions` into a pool of recent prompts and counts new `rlhf.feedback` ratings;
2. checks the trigger (ratings or interval, and a reward checkpoint newer than the last one used);
3. runs a round from the serving version (registry LATEST of "policy") against the reference (the lineage's
   first version) and the latest reward checkpoint;
4. if the gate passes: publishes the version to the registry, then a ModelEvent (acks=all) to `rlhf.models`;
5. commits the feedback offsets it counted, so a restart does not count them again.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from kafka import TopicPartition
from kafka.errors import KafkaError
from transformers import AutoTokenizer

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.health import HealthServer
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry, RegistryError
from rlhf_online.topics import Topics
from rlhf_online.trainer import metrics
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import RewardFn
from rlhf_online.trainer.kl import make_kl_controller
from rlhf_online.trainer.policy import build_policy, load_reference
from rlhf_online.trainer.round import RoundAbandoned, RoundResult, publish_policy, run_round
from rlhf_online.trainer.triggers import RoundTrigger, split_prompts, version_number

log = logging.getLogger(__name__)

POLICY, REWARD = "policy", "reward"
Messages = tuple[tuple[str, str], ...]
PromptSource = str | Messages  # a rendered prompt, or messages to render with the policy's tokenizer
RewardLoader = Callable[[Path, str], RewardFn]  # (verified folder, device) -> reward_fn


def load_reward_fn(path: Path, device: str) -> RewardFn:
    """The reward service's model, as a `reward_fn(prompts, responses) -> (B,)`."""
    from rlhf_online.reward.model import load_reward_model

    return load_reward_model(path, device=device).score


def read_prompt_file(path: str | Path) -> list[Messages]:
    """One user message per non-empty line."""
    lines = Path(path).read_text().splitlines()
    return [(("user", line.strip()),) for line in lines if line.strip()]


def render(tokenizer, source: PromptSource) -> str:
    return source if isinstance(source, str) else render_prompt(tokenizer, source)


class TrainerService:
    """Runs PPO rounds when the triggers fire; counters are for tests and logs."""

    def __init__(self, config: TrainerConfig, *, reward_loader: RewardLoader = load_reward_fn) -> None:
        self.config = config
        self.registry = Registry(config.registry_dir)
        self.topics = Topics(config.topic_prefix)
        self.reward_loader = reward_loader
        self.device = config.torch_device()
        self.trigger = RoundTrigger(
            config.min_new_ratings, config.round_interval_s, config.require_new_reward
        )
        self.kl_ctl = make_kl_controller(
            config.kl_controller, config.kl_coef, config.kl_target, config.kl_horizon
        )
        # test-friendly counters
        self.rounds_run = 0  # rounds that finished: published or rejected by the gate
        self.versions_published = 0
        self.gate_rejections = 0
        self.rounds_failed = 0
        self.last_result: RoundResult | None = None
        self.last_published: str | None = None
        self.new_ratings = 0
        self.grpc_port: int | None = None
        self._pool: deque[PromptSource] = deque(maxlen=config.prompt_pool_size)
        self._file_prompts: list[PromptSource] = (
            read_prompt_file(config.prompt_file) if config.prompt_file else []
        )
        self._last_reward_version: str | None = None
        self._last_round_at = time.monotonic()
        self._reference: tuple[str, torch.nn.Module] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer = None
        self._producer = None
        self._feedback_tps: list[TopicPartition] = []
        self._health: HealthServer | None = None
        self._waiting_logged: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bootstraps the registry if asked, connects to Kafka, serves health, starts the loop thread."""
        self.config.apply_torch_threads()
        if self.config.base_model_dir:
            from rlhf_online.bootstrap import ensure_initial_policy

            ensure_initial_policy(self.registry, Path(self.config.base_model_dir))
        self._resume_from_registry()
        if self.config.kafka_bootstrap:
            self._connect_kafka()
        self._health = HealthServer(self.config.grpc_port, host=self.config.grpc_host, name="trainer-grpc")
        self.grpc_port = self._health.port
        self._health.set_serving(True)
        self._thread = threading.Thread(target=self._loop, name="trainer-loop", daemon=True)
        self._thread.start()
        log.info(
            "trainer started (gRPC health on port %d, device %s, trigger: %d ratings or %.0fs)",
            self.grpc_port,
            self.device,
            self.config.min_new_ratings,
            self.config.round_interval_s,
        )

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stops the loop: a round in progress is abandoned at its next check (or finishes publishing)."""
        self._stop.set()
        if self._health is not None:
            self._health.set_serving(False)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.warning("the trainer loop did not stop within %.0fs", timeout_s)
        for client in (self._consumer, self._producer):
            if client is not None:
                try:
                    client.close()
                except Exception as e:  # closing must not hide the shutdown
                    log.warning("closing a Kafka client failed: %s", e)
        if self._health is not None:
            self._health.stop()
        log.info(
            "trainer stopped after %d rounds (%d published, %d rejected, %d failed)",
            self.rounds_run,
            self.versions_published,
            self.gate_rejections,
            self.rounds_failed,
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _resume_from_registry(self) -> None:
        """Picks up the reward version and KL coefficient the serving version was trained with."""
        latest = self.registry.latest(POLICY)
        if latest is None:
            return
        try:
            extra = self.registry.manifest(POLICY, latest).extra
        except RegistryError as e:
            log.warning("cannot read the manifest of policy %s: %s", latest, e)
            return
        self._last_reward_version = extra.get("reward_version")
        if "kl_coef_next" in extra:
            self.kl_ctl.value = float(extra["kl_coef_next"])

    # ---- Kafka -------------------------------------------------------------------------------------------

    def _connect_kafka(self) -> None:
        from rlhf_online.broker.clients import make_consumer, make_producer, wait_for_broker

        wait_for_broker(self.config.kafka_bootstrap, timeout_s=60)
        self._producer = make_producer(self.config.kafka_bootstrap, client_id="trainer")
        consumer = make_consumer(
            self.config.kafka_bootstrap, group_id=self.config.consumer_group, client_id="trainer"
        )
        interactions = self._partitions(consumer, self.topics.interactions)
        self._feedback_tps = self._partitions(consumer, self.topics.feedback)
        consumer.assign(interactions + self._feedback_tps)
        # interactions: the most recent ones, whatever was committed; feedback: from the committed offsets
        begin, end = consumer.beginning_offsets(interactions), consumer.end_offsets(interactions)
        per_partition = -(-self.config.prompt_pool_size // max(len(interactions), 1))
        for tp in interactions:
            consumer.seek(tp, max(begin[tp], end[tp] - per_partition))
        self._consumer = consumer

    def _partitions(self, consumer, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
        deadline = time.monotonic() + timeout_s
        while not (ids := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} does not exist; create it with `rlhf-online kafka start`")
            time.sleep(0.2)
        return [TopicPartition(topic, p) for p in sorted(ids)]

    def _poll_kafka(self, timeout_ms: int) -> None:
        """Adds new interactions to the prompt pool and counts new ratings."""
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as e:
            log.warning("polling Kafka failed, retrying: %s", e)
            self._stop.wait(1.0)
            return
        for tp, records in batches.items():
            for record in records:
                if tp.topic == self.topics.feedback:
                    self.new_ratings += 1
                else:
                    self._add_interaction(record.value)
        metrics.NEW_RATINGS.set(self.new_ratings)

    def _add_interaction(self, value: bytes) -> None:
        try:
            event = events_pb2.Interaction.FromString(value)
        except Exception as e:  # a garbled record must not stop the trainer
            log.warning("skipping an unreadable interaction: %s", e)
            return
        if event.prompt:
            self._pool.append(event.prompt)
        elif event.messages:
            self._pool.append(tuple((m.role, m.content) for m in event.messages))

    def _commit(self) -> None:
        """Commits the feedback offsets read so far: they were counted towards the round that just ran."""
        if self._consumer is None:
            return
        try:
            from kafka.structs import OffsetAndMetadata

            offsets = {
                tp: OffsetAndMetadata(self._consumer.position(tp), "", -1) for tp in self._feedback_tps
            }
            self._consumer.commit(offsets)
        except KafkaError as e:
            log.warning("committing feedback offsets failed (ratings will be counted again): %s", e)

    def _send_event(self, event: events_pb2.ModelEvent, attempts: int = 5) -> None:
        """Publishes a ModelEvent with acks=all, retrying; serving swaps when it reads it."""
        for attempt in range(1, attempts + 1):
            try:
                self._producer.send(
                    self.topics.models, key=event.version.encode(), value=event.SerializeToString()
                ).get(timeout=15)
                return
            except KafkaError as e:
                log.warning(
                    "publishing ModelEvent %s failed (attempt %d/%d): %s", event.version, attempt, attempts, e
                )
                time.sleep(min(2.0 * attempt, 10.0))
        log.error(
            "gave up publishing ModelEvent %s: it is in the registry as LATEST, replicas pick it up at "
            "their next start or the next event",
            event.version,
        )

    # ---- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._consumer is not None:
                self._poll_kafka(int(self.config.poll_interval_s * 1000))
            else:
                self._stop.wait(self.config.poll_interval_s)
            if self._stop.is_set():
                break
            reason = self.trigger.check(
                new_ratings=self.new_ratings,
                seconds_since_last_round=time.monotonic() - self._last_round_at,
                reward_version=self.registry.latest(REWARD),
                last_reward_version=self._last_reward_version,
            )
            if reason:
                self.run_round_now(reason)
            else:
                self._log_waiting()

    def _log_waiting(self) -> None:
        """One log line per change of what the loop waits for."""
        reward = self.registry.latest(REWARD)
        if reward is None:
            what = "a reward checkpoint"
        elif self.config.require_new_reward and version_number(reward) <= version_number(
            self._last_reward_version
        ):
            what = f"a reward checkpoint newer than {self._last_reward_version}"
        else:
            what = f"{self.config.min_new_ratings} new ratings or the interval"
        if what != self._waiting_logged:
            log.info("trainer waiting for %s (%d new ratings so far)", what, self.new_ratings)
            self._waiting_logged = what

    def run_round_now(self, reason: str = "asked") -> RoundResult | None:
        """Runs one round now, publishing if the gate passes; returns its result (None if it did not run)."""
        policy_version, reward_version = self.registry.latest(POLICY), self.registry.latest(REWARD)
        if policy_version is None or reward_version is None:
            log.info(
                "no round: the registry has no %s version yet", POLICY if policy_version is None else REWARD
            )
            return None
        n = self.rounds_run + self.rounds_failed + 1
        name = f"round {n}"
        started = time.perf_counter()
        try:
            result = self._round(name, n, reason, policy_version, reward_version)
        except RoundAbandoned as e:
            metrics.ROUNDS.labels("abandoned").inc()
            log.info("%s abandoned, nothing published: %s", name, e)
            return None
        except _NotReady as e:
            if str(e) != self._waiting_logged:
                log.info("%s postponed: %s", name, e)
                self._waiting_logged = str(e)
            return None
        except Exception:
            self.rounds_failed += 1
            metrics.ROUNDS.labels("failed").inc()
            log.exception("%s failed; the serving version stays %s", name, policy_version)
            self._finish_round(None)
            return None
        metrics.ROUND_DURATION.observe(time.perf_counter() - started)
        self._finish_round(reward_version)
        return result

    def _finish_round(self, reward_version: str | None) -> None:
        if reward_version is not None:
            self._last_reward_version = reward_version
        self.new_ratings = 0
        self._last_round_at = time.monotonic()
        self._waiting_logged = None
        self._commit()

    def _round(self, name: str, n: int, reason: str, policy_version: str, reward_version: str) -> RoundResult:
        # prompts first: a round without enough prompts is postponed before anything heavy is loaded
        tokenizer = AutoTokenizer.from_pretrained(self.registry.path(POLICY, policy_version))
        sources = list(self._pool) + self._file_prompts
        metrics.PROMPT_POOL.set(len(sources))
        try:
            train, heldout = split_prompts(
                [render(tokenizer, s) for s in sources],
                self.config.heldout_fraction,
                self.config.eval_prompts,
            )
        except ValueError as e:
            raise _NotReady(str(e)) from e
        policy_dir = self.registry.verify(POLICY, policy_version)
        reference_version, reference = self._reference_for(policy_version)
        reward_fn = self.reward_loader(self.registry.verify(REWARD, reward_version), self.device)
        cfg = self.config
        policy = build_policy(
            policy_dir,
            train_mode=cfg.train_mode,
            trainable_layers=cfg.trainable_layers,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            lora_target_modules=cfg.lora_targets,
            device=self.device,
        )
        log.info(
            "%s: starting (%s) from policy %s, reward %s, reference %s; %d training prompts (%d distinct), "
            "%d held out",
            name,
            reason,
            policy_version,
            reward_version,
            reference_version,
            len(train),
            len(set(train)),
            len(heldout),
        )
        result = run_round(
            policy,
            reference,
            tokenizer,
            reward_fn,
            train,
            heldout,
            cfg,
            self.kl_ctl,
            seed=cfg.seed + n,
            should_stop=self._stop.is_set,
            name=name,
        )
        self._check_still_serving(policy_version)
        decision = result.decision
        metrics.GATE_DECISIONS.labels(decision.code).inc()
        metrics.record_round(result.stats, decision.figures())
        if decision.passed:
            self._publish(name, result, tokenizer, policy_version, reward_version, reference_version)
        else:
            self.gate_rejections += 1
            metrics.ROUNDS.labels("rejected").inc()
            log.warning("%s: gate rejected the candidate (%s); nothing published", name, decision.reason)
        self.last_result = result
        self.rounds_run += 1
        return result

    def _publish(self, name, result, tokenizer, policy_version, reward_version, reference_version) -> None:
        """Registry first (atomic), then the ModelEvent that makes serving swap."""
        self._check_still_serving(policy_version)
        # From here the round finishes even if asked to stop: the publish is one atomic step.
        manifest = publish_policy(
            self.registry,
            result,
            tokenizer,
            parent_version=policy_version,
            reward_version=reward_version,
            reference_version=reference_version,
            extra={"kl_coef_next": self.kl_ctl.value, "round": name},
        )
        self.last_published = manifest.version
        metrics.ROUNDS.labels("published").inc()
        metrics.PUBLISHED_VERSION.set(version_number(manifest.version))
        if self._producer is not None:
            self._send_event(
                events_pb2.ModelEvent(
                    kind=events_pb2.POLICY,
                    action=events_pb2.PUBLISHED,
                    version=manifest.version,
                    parent_version=policy_version,
                    path=f"{POLICY}/{manifest.version}",
                    metrics=result.metrics(),
                    timestamp_ms=int(time.time() * 1000),
                )
            )
        self.versions_published += 1
        if self.config.keep_versions:
            self.registry.retain(POLICY, self.config.keep_versions, protect=[reference_version])
        log.info(
            "%s: published policy %s (parent %s, reward %s, gate %+.4f)",
            name,
            manifest.version,
            policy_version,
            reward_version,
            result.decision.improvement,
        )

    def _check_still_serving(self, policy_version: str) -> None:
        """Drops a round whose starting version is no longer LATEST: an operator rolled back (or another
        writer published) meanwhile, and publishing now would override that decision."""
        serving_now = self.registry.latest(POLICY)
        if serving_now != policy_version:
            raise RoundAbandoned(f"serving moved from {policy_version} to {serving_now} during the round")

    def _reference_for(self, policy_version: str) -> tuple[str, torch.nn.Module]:
        """The lineage's reference policy: the manifest says which, else the first policy version."""
        extra = self.registry.manifest(POLICY, policy_version).extra
        version = extra.get("reference_version") or self.registry.versions(POLICY)[0]
        if self._reference is None or self._reference[0] != version:
            self._reference = (version, load_reference(self.registry.verify(POLICY, version), self.device))
            log.info("reference policy is %s", version)
        return self._reference


class _NotReady(Exception):
    """Not enough prompts yet; the round is postponed without counting."""


def create_service(config: TrainerConfig, *, reward_loader: RewardLoader = load_reward_fn) -> TrainerService:
    """A trainer service for `config`, not started yet."""
    return TrainerService(config, reward_loader=reward_loader)
