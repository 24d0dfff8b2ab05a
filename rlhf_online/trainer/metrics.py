"""Prometheus metrics of the trainer service (default registry, served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

from rlhf_online.contract import RoundFigure

ROUNDS = Counter("rlhf_trainer_rounds_total", "PPO rounds, by outcome.", ["outcome"])
# outcome: published | rejected | failed | abandoned
BAD_RECORDS = Counter(
    "rlhf_trainer_bad_records_total",
    "Kafka records skipped as unusable (garbled, unknown kind), by topic.",
    ["topic"],
)
GATE_DECISIONS = Counter("rlhf_trainer_gate_decisions_total", "Eval gate verdicts, by result code.", ["code"])
ROUND_DURATION = Histogram(
    "rlhf_trainer_round_duration_seconds",
    "Wall time of a whole round (rollouts, scoring, PPO, eval gate).",
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
PHASE_SECONDS = Gauge("rlhf_trainer_phase_seconds", "Wall time of each phase of the last round.", ["phase"])
ROLLOUTS_PER_SECOND = Gauge("rlhf_trainer_rollouts_per_second", "Rollout sampling throughput, last round.")
REWARD_MEAN = Gauge("rlhf_trainer_reward_mean", "Mean reward-model score of the last round's rollouts.")
KL = Gauge("rlhf_trainer_kl_nats", "KL(policy || reference) per response of the last round's rollouts.")
KL_COEF = Gauge("rlhf_trainer_kl_coef", "KL coefficient beta for the next round.")
LOSS = Gauge("rlhf_trainer_loss", "Mean PPO losses of the last round, by term.", ["term"])  # pg, value, total
CLIP_FRACTION = Gauge("rlhf_trainer_clip_fraction", "Share of tokens clipped in the last round.", ["term"])
ENTROPY = Gauge("rlhf_trainer_entropy_nats", "Mean per-token policy entropy in the last round.")
GATE_SCORE = Gauge("rlhf_trainer_gate_score", "Held-out mean reward at the last gate, by policy.", ["policy"])
GATE_KL = Gauge("rlhf_trainer_gate_kl_nats", "Held-out KL(candidate || reference) at the last gate.")
NEW_RATINGS = Gauge(
    "rlhf_trainer_new_ratings",
    "Ratings applied by the newest reward checkpoint since the reward version the last round used.",
)
REWARD_RATINGS_APPLIED = Gauge(
    "rlhf_trainer_reward_ratings_applied", "ratings_applied of the newest reward checkpoint announced."
)
ROUND_EVENT_FAILURES = Counter(
    "rlhf_trainer_round_event_failures_total", "RoundEvents that could not be published to rlhf.rounds."
)
PROMPT_POOL = Gauge("rlhf_trainer_prompt_pool", "Prompts available to train and evaluate on.")
PUBLISHED_VERSION = Gauge(
    "rlhf_trainer_published_version", "Number of the last policy version published (v000007 -> 7)."
)


def record_round(stats: dict[str, float], gate: dict[str, float]) -> None:
    """Sets the per-round gauges from a round's stats and gate figures."""
    REWARD_MEAN.set(stats[RoundFigure.REWARD_MEAN])
    KL.set(stats[RoundFigure.KL_PER_RESPONSE])
    KL_COEF.set(stats[RoundFigure.KL_COEF_NEXT])
    ROLLOUTS_PER_SECOND.set(stats["rollouts_per_s"])
    ENTROPY.set(stats["ppo_entropy"])
    LOSS.labels("pg").set(stats["ppo_pg_loss"])
    LOSS.labels("value").set(stats["ppo_v_loss"])
    LOSS.labels("total").set(stats["ppo_loss"])
    CLIP_FRACTION.labels("policy").set(stats["ppo_clip_frac"])
    CLIP_FRACTION.labels("value").set(stats["ppo_v_clip_frac"])
    for phase in (
        "eval_serving",
        "generate",
        "score",
        "experience",
        "train",
        "eval_candidate",
        "eval_generate",
    ):
        PHASE_SECONDS.labels(phase).set(stats[f"{phase}_s"])
    GATE_SCORE.labels("candidate").set(gate[RoundFigure.GATE_CANDIDATE_SCORE])
    GATE_SCORE.labels("serving").set(gate[RoundFigure.GATE_SERVING_SCORE])
    GATE_KL.set(gate[RoundFigure.GATE_KL_TO_REFERENCE])


# Canary trials (rlhf_online/trainer/canary.py); arm: canary | stable, bound: lower | upper.
CANARY_ACTIVE = Gauge("rlhf_trainer_canary_active", "1 while a canary trial runs, else 0.")
CANARY_RATINGS = Gauge("rlhf_trainer_canary_ratings", "Ratings in the running canary trial, by arm.", ["arm"])
CANARY_RATE = Gauge("rlhf_trainer_canary_thumbs_up_rate", "Thumbs-up rate in the trial, by arm.", ["arm"])
CANARY_BOUND = Gauge(
    "rlhf_trainer_canary_difference_bound",
    "Always-valid confidence sequence on p_canary - p_stable in the running trial.",
    ["bound"],
)
CANARY_DECISIONS = Counter(
    "rlhf_trainer_canary_decisions_total", "Canary trials decided, by outcome and code.", ["outcome", "code"]
)


def record_trial(figures) -> None:
    """Sets the canary gauges from a trial's `TrialFigures`."""
    CANARY_RATINGS.labels("canary").set(figures.canary_ratings)
    CANARY_RATINGS.labels("stable").set(figures.stable_ratings)
    CANARY_RATE.labels("canary").set(figures.canary_rate)
    CANARY_RATE.labels("stable").set(figures.stable_rate)
    CANARY_BOUND.labels("lower").set(figures.lower)
    CANARY_BOUND.labels("upper").set(figures.upper)
