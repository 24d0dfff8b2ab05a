"""The trainer service: follows Kafka and the registry, runs PPO rounds, publishes gated policy versions.

    service = create_service(TrainerConfig(registry_dir=..., grpc_port=0, metrics_port=-1))
    service.start()          # gRPC health on service.grpc_port, a background loop
    ...
    service.stop()           # abandons a round in progress (nothing partial is ever published)

The loop (one thread; kafka-python consumers are not thread-safe):
1. polls `rlhf.interactions` into a pool of recent prompts, and `rlhf.models` for reward ModelEvents: the
   newest reward checkpoint and its `ratings_applied` figure (it never reads `rlhf.feedback`: the reward
   checkpoints say which ratings they learnt from, so a rating counts once);
2. checks the trigger: a reward checkpoint newer than the one the last round used, and either enough new
   ratings (the newest checkpoint's `ratings_applied` minus that of the last round's) or the interval;
3. runs a round from the serving version (registry LATEST of "policy") against the reference (the lineage's
   first version) and the newest reward checkpoint;
4. if the gate passes: publishes the version to the registry, then a ModelEvent (acks=all) to `rlhf.models`;
5. publishes the round's RoundEvent to `rlhf.rounds`: PASSED, REJECTED, FAILED or ABANDONED.

With `--canary-share` > 0 step 4 publishes the version without moving LATEST and starts a canary trial
(trainer/canary.py): the loop then reads the trial's ratings from `rlhf.feedback` between rounds until the
decision (PROMOTED: LATEST moves to the canary; ROLLED_BACK: it stays). Meanwhile rounds go on from the
canary (`--canary-train-during-trial`, on by default): a candidate that passes the gate waits for the
decision, then becomes the next canary (promoted) or is dropped (rolled back: its parent is withdrawn). A
trial's ratings wait in Kafka while a round runs, so reading them late changes when, not what, it decides.

At start-up it reads the registry's LATEST reward once, to resume; after that it learns of reward versions
from their ModelEvents only. Without Kafka (`--kafka-bootstrap ""`) the start-up reward is all it knows.
"""

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_online.broker.clients import (
    make_consumer,
    make_producer,
    read_topic,
    wait_for_broker,
    wait_for_partitions,
)
from rlhf_online.contract import KINDS, POLICY, REWARD, RewardFigure, kind_name, now_ms
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.health import HealthServer
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry, RegistryError
from rlhf_online.tls import server_credentials
from rlhf_online.topics import Topics
from rlhf_online.trainer import metrics
from rlhf_online.trainer.canary import CanaryRunner
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import EvalResult, RewardFn
from rlhf_online.trainer.kl import make_kl_controller
from rlhf_online.trainer.policy import PolicyWithValueHead, build_policy, load_reference, trainable_policy
from rlhf_online.trainer.publish import (
    Publisher,
    RoundRecord,
    canary_event,
    policy_event,
    publish_policy,
    round_event,
)
from rlhf_online.trainer.round import RoundAbandoned, RoundResult, run_round
from rlhf_online.trainer.triggers import RoundTrigger, prompt_hash, split_prompts, version_number

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class RewardCheckpoint:
    """A reward version the trainer knows of, and its `RewardFigure.RATINGS_APPLIED` figure."""

    version: str
    ratings_applied: int


@dataclass
class Carried:
    """A candidate the gate rejected for too small an improvement: the next round starts from it."""

    start_version: str  # the serving version it descends from (and is compared with)
    model: PreTrainedModel  # exported: LoRA merged, frozen
    value_head: torch.nn.Linear
    round: str  # the round that trained it, for the logs


@dataclass
class Pending:
    """A candidate that passed the gate during a canary trial of its parent: published once it is decided
    (a later round that passes during the same trial, trained on from it, takes its place)."""

    record: RoundRecord  # start_version: the canary it descends from (the round that trained it on first)
    result: RoundResult
    tokenizer: PreTrainedTokenizerBase
    heldout: list[str]
    value_head: torch.nn.Linear

    def carried(self) -> "Carried":
        """The waiting candidate as the next round's starting point."""
        return Carried(self.record.start_version, self.result.model, self.value_head, self.record.name)


class GateAnswers:
    """The gate's held-out answers of the last few policy versions, so a round re-scores the serving
    version's answers (with its own reward model) instead of sampling them again. An entry counts only for
    the same held-out prompts; the config (seed, sampling) is the service's, fixed for its life."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._by_version: dict[str, tuple[tuple[str, ...], EvalResult]] = {}

    def get(self, version: str, heldout: list[str]) -> EvalResult | None:
        prompts, result = self._by_version.get(version, ((), None))
        return result if prompts == tuple(heldout) else None

    def put(self, version: str | None, heldout: list[str], result: EvalResult | None) -> None:
        if version is None or result is None:
            return
        self._by_version.pop(version, None)
        self._by_version[version] = (tuple(heldout), result)
        while len(self._by_version) > self.keep:
            del self._by_version[next(iter(self._by_version))]  # the oldest


class TrainerService:
    """Runs PPO rounds when the triggers fire; counters are for tests and logs.

    Args:
        publisher: where the ModelEvents and RoundEvents go; by default one on a Kafka producer when
            `config.kafka_bootstrap` is set, none otherwise.
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        reward_loader: RewardLoader = load_reward_fn,
        publisher: Publisher | None = None,
    ) -> None:
        self.config = config
        self.registry = Registry(config.registry_dir)
        self.topics = Topics(config.topic_prefix)
        self.reward_loader = reward_loader
        self.publisher = publisher
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
        self.rounds_abandoned = 0
        self._carried: Carried | None = None  # see --keep-rejected
        self._gate_answers = GateAnswers()
        self._gate_prompts: list[str] = []  # see _eval_set
        self._pending: Pending | None = None  # see --canary-train-during-trial
        self.bad_records = 0  # Kafka records skipped as unusable
        # Rounds cut prompts to their last max_prompt_tokens tokens; a token is rarely longer than 32 chars.
        self._max_prompt_chars = 32 * config.max_prompt_tokens
        self.last_result: RoundResult | None = None
        self.last_published: str | None = None
        self.grpc_port: int | None = None
        self._pool: deque[PromptSource] = deque(maxlen=config.prompt_pool_size)
        self._file_prompts: list[PromptSource] = (
            read_prompt_file(config.prompt_file) if config.prompt_file else []
        )
        self._reward: RewardCheckpoint | None = None  # the newest reward checkpoint announced
        self._last_reward_version: str | None = None  # the one the last finished round used
        self._ratings_at_last_round = 0  # ratings_applied of the reward checkpoint the last round used
        self._last_round_at = time.monotonic()
        self._reference: tuple[str, torch.nn.Module] | None = None
        self._stop = threading.Event()
        self._draining = threading.Event()  # see drain()
        self._on_drained: Callable[[], None] | None = None
        self._trial_cut = False  # the open trial's clock shortened for the drain (--drain-trial-timeout-s)
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        self._producer = None
        self._health: HealthServer | None = None
        self._waiting_logged: str | None = None
        self.canary: CanaryRunner | None = None  # with --canary-share > 0, once Kafka is connected

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bootstraps the registry if asked, connects to Kafka, serves health, starts the loop thread."""
        self.config.apply_torch_threads()
        credentials = server_credentials(self.config)  # bad TLS settings stop us before anything starts
        if self.config.base_model_dir:
            from rlhf_online.bootstrap import ensure_initial_policy

            ensure_initial_policy(self.registry, Path(self.config.base_model_dir))
        if self.config.canary_share and not self.config.kafka_bootstrap:
            raise ValueError("--canary-share needs --kafka-bootstrap: the trial reads the users' ratings")
        if self.config.kafka_bootstrap:
            self._connect_kafka()  # before the registry is read: no reward event falls in between
        self._resume_from_registry()
        self._health = HealthServer(
            self.config.grpc_port, host=self.config.grpc_host, name="trainer-grpc", credentials=credentials
        )
        self.grpc_port = self._health.port
        self._health.set_serving(True)
        self._thread = threading.Thread(target=self._loop, name="trainer-loop", daemon=True)
        self._thread.start()
        log.info(
            "trainer started (gRPC health on port %d, device %s, trigger: %d ratings applied or %.0fs)",
            self.grpc_port,
            self.device,
            self.config.min_new_ratings,
            self.config.round_interval_s,
        )

    def drain(self, then: Callable[[], None]) -> None:
        """Winds down without leaving a trial open: a round in progress is abandoned, no round or trial
        starts, a running trial goes on to its decision, and a candidate waiting for it is not published;
        then `then()` is called (from the loop thread). SIGUSR1 in serve-trainer; the demo's last phase."""
        self._on_drained = then
        self._draining.set()
        log.info("draining: no new round or trial starts; a running trial goes on to its decision")

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._draining.is_set()

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
        if self.canary is not None:
            self.canary.close()
        if self._health is not None:
            self._health.stop()
        log.info(
            "trainer stopped after %d rounds (%d published, %d rejected, %d failed, %d abandoned)",
            self.rounds_run,
            self.versions_published,
            self.gate_rejections,
            self.rounds_failed,
            self.rounds_abandoned,
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def new_ratings(self) -> int:
        """Ratings the newest reward checkpoint applied beyond those of the reward version the last round
        used (0 when a new reward lineage starts over)."""
        if self._reward is None:
            return 0
        return max(self._reward.ratings_applied - self._ratings_at_last_round, 0)

    @property
    def reward_version(self) -> str | None:
        """The newest reward checkpoint the trainer knows of (the next round scores with it)."""
        return self._reward.version if self._reward is not None else None

    @property
    def prompts_in_pool(self) -> int:
        """Interactions' prompts held for the next round (the prompt file's not counted)."""
        return len(self._pool)

    # ---- the registry ------------------------------------------------------------------------------------

    def _resume_from_registry(self) -> None:
        """Picks up the newest reward checkpoint, and the reward version (with its ratings) and the KL
        coefficient that the serving version was trained with."""
        latest_reward = self.registry.latest(REWARD)
        if latest_reward is not None:
            self._see_reward(RewardCheckpoint(latest_reward, self._ratings_applied_of(latest_reward)))
        extra = self._serving_extra()
        self._last_reward_version = extra.get("reward_version")
        if self._last_reward_version:
            applied = extra.get("ratings_applied")
            self._ratings_at_last_round = (
                int(applied) if applied is not None else self._ratings_applied_of(self._last_reward_version)
            )
        if "kl_coef_next" in extra:
            self.kl_ctl.value = float(extra["kl_coef_next"])

    def _serving_extra(self) -> dict:
        """The `extra` of the serving policy version's manifest ({} when there is none)."""
        latest = self.registry.latest(POLICY)
        if latest is None:
            return {}
        try:
            return self.registry.manifest(POLICY, latest).extra
        except RegistryError as e:
            log.warning("cannot read the manifest of policy %s: %s", latest, e)
            return {}

    def _ratings_applied_of(self, reward_version: str) -> int:
        """A reward checkpoint's ratings_applied figure, from its manifest (0 when unknown)."""
        try:
            figures = self.registry.manifest(REWARD, reward_version).metrics
        except RegistryError as e:
            log.warning(
                "cannot read the manifest of reward %s (counting its ratings as 0): %s", reward_version, e
            )
            return 0
        return int(figures.get(RewardFigure.RATINGS_APPLIED, 0))

    # ---- Kafka -------------------------------------------------------------------------------------------

    def _connect_kafka(self) -> None:
        """A producer for the events, and one consumer of the recent interactions and of the model events
        from now on (what came before is in the registry, which `start` reads next)."""
        bootstrap = self.config.kafka_bootstrap
        wait_for_broker(bootstrap, timeout_s=60)
        self._producer = make_producer(bootstrap, client_id="trainer")
        if self.publisher is None:
            self.publisher = Publisher(self._producer, self.topics)
        if self.config.canary_share:
            self.canary = CanaryRunner(
                self.config.canary_config(), self.config.canary_share, self.registry, self.publisher,
                self.topics, bootstrap,
            )  # fmt: skip
            self.canary.resume(self._last_policy_event())  # a trial this trainer's last run left open
        consumer = make_consumer(bootstrap, group_id=self.config.consumer_group, client_id="trainer")
        interactions = wait_for_partitions(consumer, self.topics.interactions)
        models = wait_for_partitions(consumer, self.topics.models)
        consumer.assign(interactions + models)
        begin, end = consumer.beginning_offsets(interactions), consumer.end_offsets(interactions)
        per_partition = -(-self.config.prompt_pool_size // max(len(interactions), 1))
        for tp in interactions:
            consumer.seek(tp, max(begin[tp], end[tp] - per_partition))
        for tp, offset in consumer.end_offsets(models).items():
            consumer.seek(tp, offset)
        self._consumer = consumer

    def _last_policy_event(self) -> events_pb2.ModelEvent | None:
        """The newest policy ModelEvent on the models topic (its key is the kind: one partition, in order)."""
        last = None
        for record in read_topic(self.config.kafka_bootstrap, self.topics.models, timeout_s=60):
            event, _ = _decode(events_pb2.ModelEvent, record.value)
            if event is not None and event.kind == events_pb2.POLICY:
                last = event
        return last

    def _poll_kafka(self, timeout_ms: int) -> None:
        """Adds new interactions to the prompt pool and takes note of new reward checkpoints."""
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as e:
            log.warning("polling Kafka failed, retrying: %s", e)
            self._stop.wait(1.0)
            return
        for tp, records in batches.items():
            for record in records:
                self._take(tp, record)
        metrics.NEW_RATINGS.set(self.new_ratings)

    def _take(self, tp: TopicPartition, record) -> None:
        """One record; one the trainer cannot use is skipped and counted (it must not stop the trainer)."""
        handle = self._add_model_event if tp.topic == self.topics.models else self._add_interaction
        try:
            problem = handle(record.value)
        except Exception as e:  # a bug: keep going, with the traceback in the log
            log.exception("unexpected error on %s:%d@%d", tp.topic, tp.partition, record.offset)
            problem = f"internal error: {type(e).__name__}: {e}"
        if problem:
            self.bad_records += 1
            metrics.BAD_RECORDS.labels(tp.topic).inc()
            log.warning("skipping %s:%d@%d: %.300s", tp.topic, tp.partition, record.offset, problem)

    def _add_interaction(self, value: bytes | None) -> str | None:
        """Pools the interaction's prompt; what is wrong with the record, if anything."""
        event, problem = _decode(events_pb2.Interaction, value)
        if event is None:
            return problem
        if event.prompt:  # only its end is ever used: a huge prompt is not kept (nor tokenized) whole
            self._pool.append(event.prompt[-self._max_prompt_chars :])
        elif event.messages:
            self._pool.append(tuple((m.role, m.content) for m in event.messages))
        else:
            return "interaction has neither prompt nor messages"
        return None

    def _add_model_event(self, value: bytes | None) -> str | None:
        """Reward PUBLISHED events move the newest reward checkpoint; the rest (policy events) are ignored.
        Returns what is wrong with the record, if anything: a reward version that is not in the registry
        would otherwise, if numbered high, hide every real one after it."""
        event, problem = _decode(events_pb2.ModelEvent, value)
        if event is None:
            return problem
        if kind_name(event.kind) not in KINDS:
            return f"ModelEvent of unknown kind {event.kind}"
        if kind_name(event.kind) != REWARD or event.action != events_pb2.PUBLISHED:
            return None
        ratings = event.metrics.get(RewardFigure.RATINGS_APPLIED, 0.0)
        if not math.isfinite(ratings):
            return f"reward {event.version:.64} has {RewardFigure.RATINGS_APPLIED} {ratings}"
        try:
            self.registry.manifest(REWARD, event.version)
        except RegistryError as e:
            return f"reward ModelEvent of a version the registry cannot show: {e}"
        if RewardFigure.RATINGS_APPLIED not in event.metrics:
            log.warning(
                "reward ModelEvent %s has no %s figure; counting 0",
                event.version,
                RewardFigure.RATINGS_APPLIED,
            )
        self._see_reward(RewardCheckpoint(event.version, int(ratings)))
        return None

    def _see_reward(self, reward: RewardCheckpoint) -> None:
        """Keeps the newest reward checkpoint (a replayed older event changes nothing)."""
        if self._reward is not None and version_number(reward.version) <= version_number(
            self._reward.version
        ):
            return
        self._reward = reward
        metrics.REWARD_RATINGS_APPLIED.set(reward.ratings_applied)
        log.info("reward checkpoint %s: %d ratings applied", reward.version, reward.ratings_applied)

    # ---- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._step_trial():  # only the trial to wait for; the prompt pool and reward events go on
                continue
            if self._draining.is_set():
                self._drained()
                continue
            if self._consumer is not None:
                self._poll_kafka(0 if self.trial_running else int(self.config.poll_interval_s * 1000))
            else:
                self._stop.wait(self.config.poll_interval_s)
            if self._stop.is_set():
                break
            reason = self.trigger.check(
                new_ratings=self.new_ratings,
                seconds_since_last_round=time.monotonic() - self._last_round_at,
                reward_version=self.reward_version,
                last_reward_version=self._last_reward_version,
            )
            if reason:
                self.run_round_now(reason)
            else:
                self._log_waiting()

    def _log_waiting(self) -> None:
        """One log line per change of what the loop waits for."""
        reward = self.reward_version
        if reward is None:
            what = "a reward checkpoint"
        elif self.config.require_new_reward and version_number(reward) <= version_number(
            self._last_reward_version
        ):
            what = f"a reward checkpoint newer than {self._last_reward_version}"
        else:
            what = f"{self.config.min_new_ratings} new ratings applied or the interval"
        if what != self._waiting_logged:
            log.info("trainer waiting for %s (%d new ratings applied so far)", what, self.new_ratings)
            self._waiting_logged = what

    @property
    def trial_running(self) -> bool:
        """A canary trial runs (rounds go on from the canary only with --canary-train-during-trial)."""
        return self.canary is not None and self.canary.active

    def _step_trial(self) -> bool:
        """Reads a running trial's ratings; publishes or drops the waiting candidate once it is decided.
        True when the loop has nothing to do but wait for the decision."""
        if not self.trial_running:
            return False
        if self._draining.is_set() and self.config.drain_trial_timeout_s and not self._trial_cut:
            self.canary.trial.cut_short(now_ms(), self.config.drain_trial_timeout_s)
            self._trial_cut = True
        self._poll_kafka(0)
        self.canary.step(int(self.config.poll_interval_s * 1000))
        if not self.trial_running:
            self._publish_pending()
            return False
        return not self._round_allowed()

    def _round_allowed(self) -> bool:
        """Not draining, and no trial, or one whose canary may be trained on."""
        if self._draining.is_set():
            return False
        return not self.trial_running or self.config.canary_train_during_trial

    def _drained(self) -> None:
        """Called by the loop once draining and no trial runs: tells the owner once, then idles."""
        then, self._on_drained = self._on_drained, None
        if then is not None:
            log.info("drained: no trial open, no round running")
            then()
        self._stop.wait(self.config.poll_interval_s)

    def run_round_now(self, reason: str = "asked") -> RoundResult | None:
        """Runs one round now, publishing if the gate passes, then its RoundEvent; returns its result (None
        if it did not finish: nothing to run, postponed, abandoned or failed, or a canary trial blocks it)."""
        if not self._round_allowed():
            trial = (
                "draining" if self._draining.is_set() else f"the trial of {self.canary.trial.canary_version}"
            )
            log.info("no round: %s", trial)
            return None
        record = self._new_record()
        if record is None:
            return None
        try:
            result = self._round(record, reason)
        except _NotReady as e:
            self._postponed(record, e)
            return None
        except RoundAbandoned as e:
            self._abandoned(record, e)
            return None
        except Exception as e:
            self._failed(record, e)
            return None
        self._finished(record, result)
        return result

    def _new_record(self) -> RoundRecord | None:
        """The record of the round about to start, or None when there is no policy or reward to train with."""
        policy_version, reward = self._round_base(), self._reward
        if policy_version is None or reward is None:
            log.info(
                "no round: %s", "the registry has no policy version" if reward else "no reward checkpoint yet"
            )
            return None
        number = self.rounds_run + self.rounds_failed + self.rounds_abandoned + 1
        return RoundRecord(number, policy_version, reward.version, reward.ratings_applied, self.new_ratings)

    # ---- how a round ends --------------------------------------------------------------------------------

    def _postponed(self, record: RoundRecord, e: Exception) -> None:
        """Not enough prompts: no round, no event; the trigger fires again at the next check."""
        if str(e) != self._waiting_logged:
            log.info("%s postponed: %s", record.name, e)
            self._waiting_logged = str(e)

    def _abandoned(self, record: RoundRecord, e: RoundAbandoned) -> None:
        self.rounds_abandoned += 1
        metrics.ROUNDS.labels("abandoned").inc()
        log.info("%s abandoned, nothing published: %s", record.name, e)
        self._announce(round_event(record, events_pb2.ABANDONED, reason=str(e)))

    def _failed(self, record: RoundRecord, e: Exception) -> None:
        """Called in the `except` block, so the log has the traceback."""
        self.rounds_failed += 1
        metrics.ROUNDS.labels("failed").inc()
        log.exception("%s failed; the serving version stays %s", record.name, record.start_version)
        self._announce(round_event(record, events_pb2.FAILED, reason=f"{type(e).__name__}: {e}"))
        self._round_done(record, reward_used=False)

    def _finished(self, record: RoundRecord, result: RoundResult) -> None:
        metrics.ROUND_DURATION.observe(time.perf_counter() - record.started)
        self.last_result = result
        self.rounds_run += 1
        outcome = events_pb2.PASSED if result.decision.passed else events_pb2.REJECTED
        self._announce(round_event(record, outcome, result=result))
        self._round_done(record, reward_used=True)

    def _round_done(self, record: RoundRecord, *, reward_used: bool) -> None:
        """Restarts the trigger: new ratings count from this round's reward checkpoint; a finished round
        also marks its reward version used (a failed one may retry it when the interval fires)."""
        if reward_used:
            self._last_reward_version = record.reward_version
        self._ratings_at_last_round = record.ratings_applied
        self._last_round_at = time.monotonic()
        self._waiting_logged = None

    def _announce(self, event: events_pb2.RoundEvent) -> None:
        if self.publisher is not None:
            self.publisher.round_event(event)

    # ---- one round ---------------------------------------------------------------------------------------

    def _round(self, record: RoundRecord, reason: str) -> RoundResult:
        """Loads what the round needs, runs it, and publishes the candidate if the gate passed it."""
        # prompts first: a round without enough prompts is postponed before anything heavy is loaded
        tokenizer, train, heldout = self._prompts(record.start_version)
        policy, reference, reward_fn = self._load_models(record)
        log.info(
            "%s: starting (%s) from policy %s, reward %s (%d ratings applied), reference %s; %d training "
            "prompts (%d distinct), %d held out",
            record.name, reason, record.start_version, record.reward_version, record.ratings_applied,
            record.reference_version, len(train), len(set(train)), len(heldout),
        )  # fmt: skip
        serving = self._serving_for_gate(record)
        self._carried = None
        result = run_round(
            policy, reference, tokenizer, reward_fn, train, heldout, self.config, self.kl_ctl,
            seed=self.config.seed + record.number, should_stop=self._stopping, name=record.name,
            serving=serving, serving_answers=self._gate_answers.get(record.start_version, heldout),
        )  # fmt: skip
        self._gate_answers.put(record.start_version, heldout, result.serving_eval)
        self._check_still_serving(record.start_version)
        self._record_verdict(record, result)
        if result.decision.passed and self.trial_running:
            # it waits for the trial, and the next round trains on from it: the next canary carries every
            # round that passed meanwhile, a bigger step that the users' thumbs tell apart sooner
            self._pending = Pending(record, result, tokenizer, heldout, policy.value_head)
            self._carried = self._pending.carried()
            log.info("%s: its candidate waits for the trial of %s", record.name, record.start_version)
        elif result.decision.passed:
            self._publish(record, result, tokenizer, heldout)
        elif self.config.keep_rejected and result.decision.code == "no_improvement":
            self._carried = Carried(record.start_version, result.model, policy.value_head, record.name)
        elif self._pending is not None:  # the next round starts again from the waiting candidate
            self._carried = self._pending.carried()
        return result

    def _serving_for_gate(self, record: RoundRecord) -> torch.nn.Module | None:
        """The serving version for the gate when the round starts from a carried candidate (else None:
        the round's own starting policy is the serving version)."""
        if self._carried is None:
            return None
        return load_reference(self.registry.verify(POLICY, record.start_version), self.device)

    def _prompts(self, policy_version: str) -> tuple[PreTrainedTokenizerBase, list[str], list[str]]:
        """The policy's tokenizer and the (train, held-out) prompts rendered with it.

        Raises:
            _NotReady: fewer than 2 distinct prompts.
        """
        tokenizer = AutoTokenizer.from_pretrained(self.registry.path(POLICY, policy_version))
        sources = list(self._pool) + self._file_prompts
        metrics.PROMPT_POOL.set(len(sources))
        rendered = [render(tokenizer, s) for s in sources]
        try:
            train, heldout = split_prompts(rendered, self.config.heldout_fraction, len(rendered))
        except ValueError as e:
            raise _NotReady(str(e)) from e
        return tokenizer, train, self._eval_set(heldout)

    def _eval_set(self, heldout: list[str]) -> list[str]:
        """The gate's prompts: the ones it used before (held out for good, whether or not still in the pool),
        filled up to --eval-prompts from `heldout` (by hash). A fixed set makes rounds comparable and lets
        a round re-score the serving version's answers instead of sampling them again."""
        fraction, n = self.config.heldout_fraction, self.config.eval_prompts
        kept = [p for p in self._gate_prompts if prompt_hash(p) < fraction]  # not split_prompts' stand-in
        kept += [p for p in heldout if p not in kept][: max(0, n - len(kept))]
        self._gate_prompts = kept
        return list(kept)

    def _load_models(self, record: RoundRecord) -> tuple[PolicyWithValueHead, torch.nn.Module, RewardFn]:
        """The policy to train (from verified files, or the candidate the last round's gate rejected), the
        reference and the reward function."""
        policy_dir = self.registry.verify(POLICY, record.start_version)
        record.reference_version, reference = self._reference_for(record.start_version)
        reward_fn = self.reward_loader(self.registry.verify(REWARD, record.reward_version), self.device)
        c = self.config
        lora = dict(lora_r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                    lora_target_modules=c.lora_targets)  # fmt: skip
        carried = self._carried
        if carried is not None and carried.start_version != record.start_version:
            log.info(
                "%s: serving moved to %s; dropping %s's candidate",
                record.name,
                record.start_version,
                carried.round,
            )
            self._carried = carried = None
        if carried is None:
            return build_policy(policy_dir, train_mode=c.train_mode, trainable_layers=c.trainable_layers,
                                device=self.device, **lora), reference, reward_fn  # fmt: skip
        log.info(
            "%s: continuing from %s's candidate, which the gate did not publish", record.name, carried.round
        )
        policy = trainable_policy(
            carried.model, carried.value_head, train_mode=c.train_mode, trainable_layers=c.trainable_layers,
            **lora,
        )  # fmt: skip
        return policy, reference, reward_fn

    def _record_verdict(self, record: RoundRecord, result: RoundResult) -> None:
        """The gate's verdict into the metrics and counters."""
        decision = result.decision
        metrics.GATE_DECISIONS.labels(decision.code).inc()
        metrics.record_round(result.stats, decision.figures())
        if not decision.passed:
            self.gate_rejections += 1
            metrics.ROUNDS.labels("rejected").inc()
            log.warning(
                "%s: gate rejected the candidate (%s); nothing published", record.name, decision.reason
            )

    def _publish(
        self, record: RoundRecord, result: RoundResult, tokenizer: PreTrainedTokenizerBase, heldout: list[str]
    ) -> None:
        """Registry first (atomic), then the ModelEvent that makes serving swap (or, with a canary share,
        LATEST unmoved and the trial's start), then retention; the gate keeps the version's answers on
        `heldout` for the next round."""
        self._check_still_serving(record.start_version)
        # From here the round finishes even if asked to stop: the publish is one atomic step.
        manifest = publish_policy(
            self.registry, result, tokenizer, parent_version=record.start_version,
            reward_version=record.reward_version, reference_version=record.reference_version,
            extra={"kl_coef_next": self.kl_ctl.value, "round": record.name,
                   "ratings_applied": record.ratings_applied},
            set_latest=self.canary is None,
        )  # fmt: skip
        record.published_version = self.last_published = manifest.version
        self._gate_answers.put(manifest.version, heldout, result.candidate_eval)
        metrics.ROUNDS.labels("published").inc()
        metrics.PUBLISHED_VERSION.set(version_number(manifest.version))
        if self.canary is not None:
            self.canary.start(record.start_version, canary_event(manifest, result, self.canary.share))
        elif self.publisher is not None:
            self.publisher.model_event(policy_event(manifest, result))
        self.versions_published += 1
        if self.config.keep_versions:
            self.registry.retain(POLICY, self.config.keep_versions, protect=[record.reference_version])
        log.info(
            "%s: published policy %s (parent %s, reward %s, gate %+.4f)",
            record.name, manifest.version, record.start_version, record.reward_version,
            result.decision.improvement,
        )  # fmt: skip

    def _publish_pending(self) -> None:
        """After a trial's decision: the candidate trained from its canary is the next canary if the canary
        was promoted (it is LATEST now), else it is dropped with the canary it descends from."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        record = pending.record
        if self._draining.is_set():
            log.info("%s: draining, so its candidate is not published", record.name)
            return
        if self.registry.latest(POLICY) != record.start_version:
            log.info("%s: dropping its candidate: %s was not promoted", record.name, record.start_version)
            return
        self._publish(record, pending.result, pending.tokenizer, pending.heldout)

    def _round_base(self) -> str | None:
        """The version a round starts from: LATEST, or the canary of a running trial."""
        return self.canary.trial.canary_version if self.trial_running else self.registry.latest(POLICY)

    def _check_still_serving(self, policy_version: str) -> None:
        """Drops a round whose starting version is no longer LATEST (or the running trial's canary): an
        operator rolled back (or another writer published) meanwhile, and publishing now would override
        that decision."""
        serving_now = self._round_base()
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


def _decode(cls, value: bytes | None):
    """(the message, None), or (None, why `value` is not a `cls`)."""
    name = cls.DESCRIPTOR.full_name
    if value is None:
        return None, f"no value; expected a serialized {name}"
    try:
        return cls.FromString(value), None
    except DecodeError as e:
        return None, f"not a {name}: {e}"


class _NotReady(Exception):
    """Not enough prompts yet; the round is postponed without counting."""


def create_service(
    config: TrainerConfig, *, reward_loader: RewardLoader = load_reward_fn, publisher: Publisher | None = None
) -> TrainerService:
    """A trainer service for `config`, not started yet."""
    return TrainerService(config, reward_loader=reward_loader, publisher=publisher)
