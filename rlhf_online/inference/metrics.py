"""Prometheus metrics of the inference service (the engine exports its batching metrics itself)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "rlhf_inference_requests_total", "RPCs answered, by method and status code.", ["method", "code"]
)
LATENCY = Histogram(
    "rlhf_inference_request_latency_seconds",
    "Time from receiving an RPC to its last response message, by method.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FEEDBACK = Counter(
    "rlhf_inference_feedback_total", "Ratings acknowledged by the broker, by rating.", ["rating"]
)
PUBLISH_FAILURES = Counter(
    "rlhf_inference_publish_failures_total",
    "Failed attempts to publish an event (retried), by topic.",
    ["topic"],
)
PUBLISH_DROPPED = Counter(
    "rlhf_inference_publish_dropped_total",
    "Events given up on (outbox full or shutdown), by topic.",
    ["topic"],
)
OUTBOX = Gauge("rlhf_inference_outbox_events", "Interaction events waiting to be acknowledged by the broker.")
JOURNAL_FAILURES = Counter(
    "rlhf_inference_outbox_journal_failures_total",
    "Interactions the outbox journal could not write (disk full or gone); kept in memory only.",
)
FOLLOWER_BAD_RECORDS = Counter(
    "rlhf_inference_follower_bad_records_total", "Records on the models topic skipped as unusable."
)
SWAPS = Counter("rlhf_inference_swaps_total", "Policy versions swapped into serving.")
SWAP_FAILURES = Counter(
    "rlhf_inference_swap_failures_total", "Policy versions refused (corrupt or unloadable)."
)
