"""Prometheus metrics of the reward service (default registry, served by `start_http_server`)."""

import logging

from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

RECORDS = Counter("rlhf_reward_records_total", "Kafka records consumed", ["topic"])
EXAMPLES = Counter(
    "rlhf_reward_examples_total", "Joined ratings admitted (rate = labelled examples/s)", ["split"]
)
EXAMPLES_PER_SECOND = Gauge(
    "rlhf_reward_examples_per_second", "Ratings applied per second between the last two checkpoints"
)
DUPLICATES = Counter("rlhf_reward_duplicates_total", "Ratings skipped because their event_id was seen")
JOIN_BUFFER = Gauge("rlhf_reward_join_buffer_size", "Entries held by the join buffer", ["kind"])
JOIN_EVENTS = Counter(
    "rlhf_reward_join_events_total",
    "Join outcomes: matched, interaction_expired/evicted, feedback_expired/evicted, duplicate_*",
    ["event"],
)
DLQ = Counter("rlhf_reward_dlq_total", "Records sent to the dead-letter topic", ["reason"])
DLQ_FAILURES = Counter("rlhf_reward_dlq_failures_total", "Dead letters the broker did not acknowledge")
UPDATES = Counter("rlhf_reward_updates_total", "Reward model updates (mini-batches)")
LOSS = Gauge("rlhf_reward_loss", "Training loss of the last update", ["part"])
UPDATE_SECONDS = Histogram(
    "rlhf_reward_update_seconds", "Wall time of one update", buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30)
)
RATING_TO_UPDATE = Histogram(
    "rlhf_reward_rating_to_update_seconds",
    "From the rating's timestamp (accepted by SubmitFeedback) to the end of the update that applied it",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
HELDOUT_ACCURACY = Gauge("rlhf_reward_heldout_accuracy", "Accuracy on the held-out window (ratio)")
HELDOUT_AUC = Gauge("rlhf_reward_heldout_auc", "ROC AUC on the held-out window")
HELDOUT_LOG_LOSS = Gauge("rlhf_reward_heldout_log_loss", "Log-loss on the held-out window (nats)")
HELDOUT_SIZE = Gauge("rlhf_reward_heldout_examples", "Examples in the held-out window")
CONSUMER_LAG = Gauge(
    "rlhf_reward_consumer_lag_records", "End offset minus position, summed per topic", ["topic"]
)
CHECKPOINTS = Counter("rlhf_reward_checkpoints_total", "Reward checkpoints published")
CHECKPOINT_VERSION = Gauge("rlhf_reward_checkpoint_version", "Number of the last published reward version")
CHECKPOINT_SECONDS = Histogram(
    "rlhf_reward_checkpoint_seconds",
    "Wall time to publish a checkpoint",
    buckets=(0.1, 0.3, 1, 3, 10, 30, 100),
)
COMMITTED = Counter("rlhf_reward_offset_commits_total", "Offset commits after a checkpoint")


def observe_update(stats: dict[str, float], elapsed_s: float) -> None:
    """One update's count, wall time and loss parts."""
    UPDATES.inc()
    UPDATE_SECONDS.observe(elapsed_s)
    for part in ("loss", "pointwise_loss", "pairwise_loss"):
        if part in stats:
            LOSS.labels(part).set(stats[part])


def observe_heldout(figures: dict[str, float]) -> None:
    """The figures of `OnlineLearner.evaluate()`."""
    HELDOUT_ACCURACY.set(figures["accuracy"])
    HELDOUT_AUC.set(figures["auc"])
    HELDOUT_LOG_LOSS.set(figures["log_loss"])
    HELDOUT_SIZE.set(figures["n"])


def observe_checkpoint(version: str, elapsed_s: float, ratings_per_s: float) -> None:
    CHECKPOINTS.inc()
    CHECKPOINT_VERSION.set(int(version[1:]))
    CHECKPOINT_SECONDS.observe(elapsed_s)
    EXAMPLES_PER_SECOND.set(ratings_per_s)


def export_lag(consumer) -> None:
    """End offset minus position of the consumer's partitions, summed per topic (skipped if unavailable)."""
    assigned = list(consumer.assignment())
    if not assigned:
        return
    try:
        ends = consumer.end_offsets(assigned)
        lag: dict[str, int] = {}
        for tp in assigned:
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends[tp] - consumer.position(tp))
    except KafkaError as e:
        log.debug("consumer lag not available: %s", e)
        return
    for topic, n in lag.items():
        CONSUMER_LAG.labels(topic).set(n)
