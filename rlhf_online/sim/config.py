"""Settings of the simulated users (`rlhf-online simulate`), the report and the demo."""

import math
from dataclasses import dataclass, field


@dataclass
class SimulateConfig:
    """Simulated users who chat with the policy, judge each answer by a hidden preference and rate it."""

    target: str = field(default="127.0.0.1:50051", metadata={"help": "host:port of the ChatService."})
    prompts_file: str = field(
        default="", metadata={"help": "Prompt file, one prompt per line ('#' comments); empty: the built-in one."}
    )
    judge: str = field(
        default="lowercase",
        metadata={"help": "Hidden preference: a built-in (lowercase, vowels, charclass, length, keyword) or "
                          "module:function taking (prompt, response) and returning a bool or P(thumbs up)."},
    )
    judge_args: str = field(
        default="", metadata={"help": "Options of a built-in judge, e.g. threshold=0.4,temperature=0.05."}
    )
    rater_noise: float = field(
        default=0.1, metadata={"help": "Chance that a rater votes against their own judgement (raters disagree)."}
    )
    rated_share: float = field(default=1.0, metadata={"help": "Share of answers the users rate, in (0, 1]."})
    stream_share: float = field(default=0.5, metadata={"help": "Share of requests sent with ChatStream."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    users: int = field(default=100, metadata={"help": "Distinct simulated users (user ids) the requests come from."})
    rate: float = field(default=0.0, metadata={"help": "Requests per second across all users; 0: as fast as served."})
    duration_s: float = field(default=60.0, metadata={"help": "Stop after this many seconds; 0: no time limit."})
    max_requests: int = field(default=0, metadata={"help": "Stop after this many requests; 0: no limit."})
    max_new_tokens: int = field(default=0, metadata={"help": "max_new_tokens of each request; 0: server default."})
    temperature: float = field(default=-1.0, metadata={"help": "Sampling temperature; negative: server default."})
    seed: int = field(default=0, metadata={"help": "Seed of the users' choices (prompts, ratings, noise)."})
    chat_deadline_s: float = field(default=120.0, metadata={"help": "Deadline of one Chat/ChatStream call."})
    feedback_deadline_s: float = field(default=30.0, metadata={"help": "Deadline of one SubmitFeedback call."})
    outcomes_path: str = field(
        default="", metadata={"help": "Write one JSON line per request (answer, version, rating, ack) here."}
    )
    summary_path: str = field(default="", metadata={"help": "Write the end summary as JSON here."})
    log_level: str = field(default="INFO", metadata={"help": "Python log level."})

    def __post_init__(self) -> None:
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
    out_dir: str = field(default="", metadata={"help": "Folder to write report.html and plots into; empty: "
                                                       "runs/<timestamp>."})
    outcomes_path: str = field(
        default="", metadata={"help": "Simulator outcomes (JSON lines) to add the hidden judge's score; optional."}
    )
    since_ms: int = field(default=0, metadata={"help": "Ignore records older than this Unix time in ms."})
    time_bin_s: float = field(default=0.0, metadata={"help": "Width of the time bins of the up-rate plot; "
                                                             "0: chosen from the run's length."})
    title: str = field(default="rlhf-online run", metadata={"help": "Title of the report."})
    log_level: str = field(default="INFO", metadata={"help": "Python log level."})
