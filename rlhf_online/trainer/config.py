"""Configuration of the trainer service: triggers, PPO hyperparameters, the eval gate, and where things live.

Defaults are sized so that one round on the tiny model takes tens of seconds on two CPU cores.
"""

import math
from dataclasses import dataclass, field

from rlhf_online.canary.decision import CanaryConfig
from rlhf_online.config import ServiceConfig, grpc_port_field, metrics_port_field

_AT_LEAST_ONE = (
    "rollouts_per_round", "generation_batch_size", "max_new_tokens", "max_prompt_tokens", "ppo_epochs",
    "minibatch_size", "eval_prompts", "eval_samples_per_prompt", "prompt_pool_size", "lora_r", "kl_horizon",
)  # fmt: skip
_POSITIVE = (
    "temperature", "learning_rate", "clip_range", "clip_range_value", "max_grad_norm", "gate_max_kl",
    "kl_target", "poll_interval_s",
)  # fmt: skip
_NON_NEGATIVE = ("kl_coef", "vf_coef", "ent_coef", "round_interval_s", "min_new_ratings", "keep_versions")


@dataclass
class TrainerConfig(ServiceConfig):
    """PPO trainer: runs rounds when ratings arrive and publishes policy versions that pass the eval gate."""

    # ---- where things live -------------------------------------------------------------------------------
    base_model_dir: str = field(
        default="",
        metadata={"help": "Model folder published as the first policy version when the registry has none."},
    )
    grpc_port: int = grpc_port_field(50052)
    metrics_port: int = metrics_port_field(9102)
    seed: int = field(default=0, metadata={"help": "Base seed; round k uses seed + k."})
    # ---- when a round runs --------------------------------------------------------------------------------
    min_new_ratings: int = field(
        default=32,
        metadata={
            "help": "Run a round once the reward checkpoints have applied this many ratings since the reward "
            "version the last round used (their ratings_applied figure; 0: off)."
        },
    )
    round_interval_s: float = field(
        default=600.0, metadata={"help": "Also run a round every this many seconds (0: off)."}
    )
    require_new_reward: bool = field(
        default=True,
        metadata={"help": "Only run a round when a reward checkpoint newer than the last one used exists."},
    )
    poll_interval_s: float = field(default=1.0, metadata={"help": "Seconds between checks of the triggers."})
    keep_versions: int = field(
        default=10,
        metadata={
            "help": "Policy versions kept in the registry after each publish, besides LATEST, its parent and "
            "the reference (0 keeps all); Rollback can only go back to a kept version."
        },
    )
    consumer_group: str = field(
        default="rlhf-trainer",
        metadata={
            "help": "Consumer group id of the trainer's consumer (it commits no offsets: it reads the most "
            "recent interactions and the model events from its start on)."
        },
    )
    prompt_pool_size: int = field(
        default=512, metadata={"help": "Most recent interactions kept as the pool of training prompts."}
    )
    prompt_file: str = field(
        default="", metadata={"help": "Optional file of extra prompts, one user message per line."}
    )
    heldout_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of prompts (by hash) held out for the eval gate, never trained on."},
    )
    # ---- rollouts -----------------------------------------------------------------------------------------
    rollouts_per_round: int = field(default=64, metadata={"help": "Responses sampled per round."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest response sampled in a rollout."})
    max_prompt_tokens: int = field(
        default=192, metadata={"help": "Prompts are cut to their last this many tokens."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts and eval."})
    # ---- PPO ----------------------------------------------------------------------------------------------
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over the round's rollouts."})
    minibatch_size: int = field(default=16, metadata={"help": "Rollouts per gradient step."})
    learning_rate: float = field(
        default=1e-5,
        metadata={
            "help": "AdamW learning rate. The default suits pretrained models (on SmolLM2-135M-Instruct one "
            "round at 5e-4 turned 'The capital of France is Paris.' into French word salad); the tiny "
            "random preset needs 5e-4 (the demo sets it)."
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping by global norm."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Value clip epsilon."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the per-token rewards."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages per round."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL penalty estimator: k1 or k3."})
    kl_controller: str = field(
        default="fixed", metadata={"help": "KL coefficient controller: fixed or adaptive."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Initial KL coefficient beta."})
    kl_target: float = field(
        default=6.0, metadata={"help": "Adaptive controller: target KL per response (nats)."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive controller: horizon in rollouts."})
    train_mode: str = field(
        default="top_layers", metadata={"help": "top_layers (the rest frozen) or lora (peft adapters)."}
    )
    trainable_layers: int = field(default=2, metadata={"help": "top_layers: how many top blocks train."})
    lora_r: int = field(default=8, metadata={"help": "lora: adapter rank."})
    lora_alpha: int = field(default=16, metadata={"help": "lora: scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the adapters."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "lora: comma-separated module names."}
    )
    # ---- eval gate ----------------------------------------------------------------------------------------
    eval_prompts: int = field(default=16, metadata={"help": "Held-out prompts the gate evaluates on."})
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Sampled answers per held-out prompt (more: a less noisy gate)."}
    )
    eval_seed: int = field(
        default=1234, metadata={"help": "Sampling seed of the gate (same for both versions)."}
    )
    gate_margin: float = field(
        default=0.0, metadata={"help": "Mean reward must beat the serving version's by at least this."}
    )
    keep_rejected: bool = field(
        default=False,
        metadata={
            "help": "A candidate the gate rejects for too small an improvement is where the next round "
            "starts (still compared with the serving version, still bounded by --gate-max-kl), so steps "
            "smaller than the gate's noise add up; off: every round starts from the serving version. Off by "
            "default: on the tiny preset with a perfect reward (benchmarks/ppo_oracle.py --carry) it made no "
            "clear difference."
        },
    )
    gate_max_kl: float = field(
        default=20.0,
        metadata={
            "help": "Bound on KL(candidate || reference), summed over a response's tokens, in nats "
            "(it grows with --max-new-tokens)."
        },
    )

    # ---- canary trials (docs/design.md) -------------------------------------------------------------------
    canary_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of traffic a passed version serves first, beside the stable one, until the users' "
            "thumbs promote or roll it back (0: off, a passed version serves everyone at once)."
        },
    )
    canary_train_during_trial: bool = field(
        default=True,
        metadata={
            "help": "While a canary trial runs, the next round trains from the canary; a candidate it passes "
            "waits for the trial: the next canary if the canary is promoted, dropped if it is rolled back "
            "(off: no round during a trial)."
        },
    )
    drain_trial_timeout_s: float = field(
        default=0.0,
        metadata={
            "help": "Draining (SIGUSR1): a canary trial still open this many seconds later times out, with "
            "its time-out outcome (roll back); 0: wait for its decision however long it takes."
        },
    )
    canary_min_ratings: int = field(
        default=50, metadata={"help": "Canary trial: no decision before each arm has this many ratings."}
    )
    canary_alpha: float = field(
        default=0.05, metadata={"help": "Canary trial: bound on each wrong decision (promotion, rollback)."}
    )
    canary_margin: float = field(
        default=0.05,
        metadata={
            "help": "Canary trial: promote when the canary's thumbs-up rate is significantly not worse than "
            "stable's by more than this (0: only when significantly better)."
        },
    )
    canary_max_ratings: int = field(
        default=2000,
        metadata={"help": "Canary trial: time out (roll back) when the canary arm has this many ratings."},
    )
    canary_max_seconds: float = field(
        default=3600.0,
        metadata={"help": "Canary trial: time out (roll back) this many seconds after it started (0: off)."},
    )

    def canary_config(self) -> CanaryConfig:
        """The sequential test's settings (the mixture spread tau tuned to the margin, 0.05 without one)."""
        return CanaryConfig(
            alpha=self.canary_alpha, margin=self.canary_margin, tau=self.canary_margin or 0.05,
            min_ratings_per_arm=self.canary_min_ratings, max_canary_ratings=self.canary_max_ratings,
            max_duration_s=self.canary_max_seconds,
        )  # fmt: skip

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_share < 1.0:
            raise ValueError(f"canary_share must be in [0, 1) (0: off), got {self.canary_share}")
        try:
            self.canary_config()
        except ValueError as e:
            raise ValueError(f"bad --canary-* setting: {e}") from e
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.minibatch_size > self.rollouts_per_round:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be <= rollouts_per_round "
                f"({self.rollouts_per_round}); lower --minibatch-size or raise --rollouts-per-round"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.kl_controller not in ("fixed", "adaptive"):
            raise ValueError(f"kl_controller must be fixed or adaptive, got {self.kl_controller!r}")
        if self.train_mode not in ("top_layers", "lora"):
            raise ValueError(f"train_mode must be top_layers or lora, got {self.train_mode!r}")
        if self.train_mode == "top_layers" and self.trainable_layers < 1:
            raise ValueError("trainable_layers must be >= 1 with train_mode top_layers")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma ({self.gamma}) and lam ({self.lam}) must be in [0, 1]")
        if self.min_new_ratings == 0 and self.round_interval_s == 0:
            raise ValueError("set --min-new-ratings or --round-interval-s (with both 0 no round ever runs)")

    @property
    def lora_targets(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
