"""Settings of the inference service (`rlhf-online serve-inference`)."""

import math
from dataclasses import dataclass, field

from rlhf_online.config import ServiceConfig, grpc_port_field, metrics_port_field


@dataclass
class InferenceConfig(ServiceConfig):
    """Serve the policy over gRPC (ChatService, ModelAdmin) and publish answers and ratings to Kafka."""

    grpc_port: int = grpc_port_field(50051)
    metrics_port: int = metrics_port_field(9101)
    base_model_dir: str = field(
        default=".rlhf/models/tiny",
        metadata={
            "help": "Hugging Face model directory published as the first policy version if the registry "
            "has none."
        },
    )
    max_batch_size: int = field(
        default=8, metadata={"help": "Most requests generated together in one batch."}
    )
    max_batch_tokens: int = field(
        default=0,
        metadata={
            "help": "Most tokens (prompt + max_new_tokens of each row) the running batch may hold; a request "
            "that does not fit waits. 0: max_batch_size times the model's context."
        },
    )
    max_queue: int = field(
        default=64, metadata={"help": "Requests waiting beyond this are refused (RESOURCE_EXHAUSTED)."}
    )
    default_max_new_tokens: int = field(
        default=48, metadata={"help": "max_new_tokens when a request sets 0."}
    )
    max_new_tokens_cap: int = field(
        default=256, metadata={"help": "Largest max_new_tokens a request may ask."}
    )
    default_temperature: float = field(
        default=1.0, metadata={"help": "Temperature when a request leaves it unset (0 = greedy)."}
    )
    signing_key: str = field(
        default="",
        metadata={
            "help": "Secret HMAC key for response ids; every replica needs the same one. Empty: a random "
            "per-process key (single replica only)."
        },
    )
    signing_keys: str = field(
        default="",
        metadata={
            "help": "Key rotation, in place of signing_key: 'id:secret,id:secret@retire_time,...', the first "
            "signs, the others verify until their retire time (ISO 8601 with zone, or unix seconds). "
            "signing_key alone is the key 'k0' (docs/security.md)."
        },
    )
    admin_token: str = field(default="", metadata={"help": "Bearer token for ModelAdmin; empty disables it."})
    allow_insecure_admin: bool = field(
        default=False,
        metadata={
            "help": "Serve ModelAdmin to remote peers over plaintext too. Off: ModelAdmin needs TLS, or a "
            "peer on this machine, so the admin token never crosses a network in clear text."
        },
    )
    feedback_rate_per_s: float = field(
        default=2.0, metadata={"help": "Sustained ratings per second per user."}
    )
    feedback_burst: int = field(default=20, metadata={"help": "Ratings a user may send in a burst."})
    feedback_ack_timeout_s: float = field(
        default=10.0, metadata={"help": "Longest wait for the broker to acknowledge a rating."}
    )
    outbox_dir: str = field(
        default="",
        metadata={
            "help": "Directory of the outbox journal: answers' Interactions are on disk before the answer "
            "leaves, and a process started on the same directory sends what a killed one left unsent. One "
            "per replica, on a volume that outlives the container (Kubernetes: an emptyDir). Empty: memory "
            "only (an Interaction the broker has not acknowledged dies with the process)."
        },
    )
    outbox_fsync: bool = field(
        default=False,
        metadata={"help": "fsync the outbox journal after every record (survives a machine crash too)."},
    )
    max_user_id_chars: int = field(default=128, metadata={"help": "Longest accepted user_id."})
    max_comment_chars: int = field(default=2000, metadata={"help": "Longest accepted feedback comment."})
    max_messages: int = field(default=64, metadata={"help": "Most messages accepted in one ChatRequest."})
    follow_models: bool = field(default=True, metadata={"help": "Follow the models topic and hot-swap."})
    replica_id: str = field(
        default="", metadata={"help": "Name of this replica in logs and client ids; empty: the host name."}
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata={"help": "Time in-flight requests get on SIGTERM."}
    )
    tgi_port: int = field(
        default=-1,
        metadata={
            "help": "Port of the TGI-compatible HTTP API (POST /generate, /generate_stream, /; GET /info, "
            "/health; POST /feedback), on grpc_host. 0: any free port, -1: off."
        },
    )
    backend: str = field(
        default="local",
        metadata={
            "help": "local: generate with the in-process engine. tgi: send generation to the TGI-compatible "
            "server at tgi_url (signing, events, feedback, limits and metrics stay here; the tokenizer "
            "comes from base_model_dir, the model version from the server's /info)."
        },
    )
    tgi_url: str = field(default="", metadata={"help": "Base URL of the TGI server for backend=tgi."})
    tgi_timeout_s: float = field(
        default=120.0, metadata={"help": "Longest one request to tgi_url may take, streaming included."}
    )

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if self.max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must be >= 0 (0: max_batch_size times the model's context)")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be between 1 and "
                f"max_new_tokens_cap ({self.max_new_tokens_cap})"
            )
        if not (math.isfinite(self.default_temperature) and self.default_temperature >= 0):
            raise ValueError("default_temperature must be a finite number >= 0")
        if self.feedback_rate_per_s <= 0 or self.feedback_burst < 1:
            raise ValueError("feedback_rate_per_s must be > 0 and feedback_burst >= 1")
        if self.backend not in ("local", "tgi"):
            raise ValueError(f"backend is {self.backend!r}; use local or tgi")
        if self.backend == "tgi" and not self.tgi_url.startswith(("http://", "https://")):
            raise ValueError("backend tgi needs tgi_url, the TGI server's base URL (http://host:port)")
        if self.tgi_timeout_s <= 0:
            raise ValueError("tgi_timeout_s must be > 0")
