"""Configuration of the reward service (`rlhf-online serve-reward`): flags or RLHF_* environment variables."""

from dataclasses import dataclass, field

from rlhf_online.config import ServiceConfig, grpc_port_field, metrics_port_field

# How a reward model reads an answer (reward/model.py says what each does).
POOLINGS = ("response_mean", "last", "response_features")


@dataclass
class RewardConfig(ServiceConfig):
    """Learn the reward model online from the joined feedback stream and publish reward checkpoints."""

    grpc_port: int = grpc_port_field(50053)
    metrics_port: int = metrics_port_field(9103)
    # ---- Kafka
    group_id: str = field(
        default="", metadata={"help": "consumer group of the reward service (empty: TOPIC_PREFIX.reward)"}
    )
    client_id: str = field(default="rlhf-reward", metadata={"help": "Kafka client id prefix"})
    # ---- model
    base_model_dir: str = field(
        default="",
        metadata={
            "help": "model to initialise the reward model from when the registry has no reward version; "
            "empty: the registry's oldest policy (the lineage's base), else the tiny preset"
        },
    )
    max_length: int = field(default=256, metadata={"help": "token cap of prompt+response (keeps the end)"})
    trainable_layers: int = field(
        default=2, metadata={"help": "top transformer layers to train (plus the head); -1 trains all"}
    )
    backbone_layers: int = field(
        default=-1,
        metadata={
            "help": "keep only the bottom N transformer blocks of the base model in a new reward model "
            "(-1: all; 0: embeddings and head only, a bag-of-tokens scorer)"
        },
    )
    pooling: str = field(
        default="response_mean",
        metadata={
            "help": "how a new reward model reads the answer: response_mean (per-token scores averaged), "
            "response_features (mean, max, first and last token, length; sees starts, ends and length), "
            "last (the last token, Hugging Face's own)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the head init, replay sampling and batching"})
    # ---- learning
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    update_every_examples: int = field(
        default=16, metadata={"help": "update once this many new training examples are waiting"}
    )
    update_interval_s: float = field(
        default=5.0, metadata={"help": "...or once the oldest waiting example is this old (seconds)"}
    )
    replay_ratio: float = field(
        default=1.0, metadata={"help": "replayed old examples per new example in each update"}
    )
    replay_capacity: int = field(default=4096, metadata={"help": "size of the replay buffer (reservoir)"})
    steps_per_update: int = field(default=2, metadata={"help": "optimizer steps on each update's batch"})
    micro_batch_size: int = field(default=32, metadata={"help": "examples per forward/backward pass"})
    pairwise_coef: float = field(
        default=1.0, metadata={"help": "weight of the Bradley-Terry loss on up/down pairs of one prompt"}
    )
    class_weighting: bool = field(
        default=True, metadata={"help": "balance thumbs up/down in the pointwise loss"}
    )
    # ---- held-out evaluation
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "fraction of events (by hash of event_id) never trained on"}
    )
    heldout_window: int = field(default=256, metadata={"help": "most recent held-out examples evaluated"})
    eval_every_updates: int = field(
        default=10, metadata={"help": "evaluate the held-out window every N updates"}
    )
    # ---- join
    join_ttl_s: float = field(
        default=3600.0,
        metadata={"help": "how long (stream time) an interaction waits for ratings and vice versa"},
    )
    join_max_interactions: int = field(default=100_000, metadata={"help": "interactions held for the join"})
    join_max_waiting: int = field(default=100_000, metadata={"help": "ratings held waiting for interactions"})
    # ---- checkpoints
    checkpoint_every_updates: int = field(
        default=20, metadata={"help": "publish a reward checkpoint (and commit offsets) every K updates"}
    )
    checkpoint_interval_s: float = field(
        default=0.0,
        metadata={"help": "also publish when the last checkpoint is this old, if it has news (0: off)"},
    )
    keep_versions: int = field(
        default=5, metadata={"help": "reward versions kept by retention (0 keeps all)"}
    )

    def __post_init__(self) -> None:
        checks = [
            (self.max_length >= 8, "--max-length must be at least 8 tokens"),
            (self.trainable_layers >= -1, "--trainable-layers must be -1 (all) or >= 0"),
            (self.backbone_layers >= -1, "--backbone-layers must be -1 (all) or >= 0"),
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}"),
            (self.learning_rate > 0, "--learning-rate must be > 0"),
            (self.update_every_examples >= 1, "--update-every-examples must be >= 1"),
            (self.update_interval_s > 0, "--update-interval-s must be > 0"),
            (self.replay_ratio >= 0, "--replay-ratio must be >= 0"),
            (self.replay_capacity >= 0, "--replay-capacity must be >= 0"),
            (self.steps_per_update >= 1, "--steps-per-update must be >= 1"),
            (self.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
            (self.pairwise_coef >= 0, "--pairwise-coef must be >= 0"),
            (0 <= self.heldout_fraction < 1, "--heldout-fraction must be in [0, 1)"),
            (self.heldout_window >= 1, "--heldout-window must be >= 1"),
            (self.eval_every_updates >= 1, "--eval-every-updates must be >= 1"),
            (self.join_ttl_s > 0, "--join-ttl-s must be > 0"),
            (self.join_max_interactions >= 1, "--join-max-interactions must be >= 1"),
            (self.join_max_waiting >= 1, "--join-max-waiting must be >= 1"),
            (self.checkpoint_every_updates >= 1, "--checkpoint-every-updates must be >= 1"),
            (self.checkpoint_interval_s >= 0, "--checkpoint-interval-s must be >= 0"),
            (self.keep_versions >= 0, "--keep-versions must be >= 0 (0 keeps every version)"),
            (
                self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
                "--log-level: DEBUG/INFO/WARNING/ERROR",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
