"""Config dataclasses -> command-line flags and `RLHF_*` environment variables.

Each service has one dataclass; every field carries `metadata={"help": ...}`, which becomes its `--help`.
A field `kafka_bootstrap` is set by `--kafka-bootstrap` or by `RLHF_KAFKA_BOOTSTRAP` (the flag wins), which is
what Kubernetes sets. Only entry points call `parse_config`, passing `os.environ` in: library code never reads
the environment itself.
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "RLHF_"


def env_name(field_name: str) -> str:
    """`kafka_bootstrap` -> `RLHF_KAFKA_BOOTSTRAP`."""
    return ENV_PREFIX + field_name.upper()


def env_names(cls: type) -> set[str]:
    """Every environment variable a config dataclass reads."""
    return {env_name(f.name) for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one `--flag` per field of `cls`, with the field's help and env variable in its help text."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default {_shown(_default(f))}]"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag, type=_converter(kind), default=None, help=help_text, metavar=f.name.upper()
            )


def from_namespace(cls: type[T], args: argparse.Namespace, env: Mapping[str, str]) -> T:
    """Builds `cls` from parsed flags, then environment variables, then field defaults."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
        elif env_name(f.name) in env:
            values[f.name] = _parse_env(f.name, env[env_name(f.name)], _base_type(hints[f.name]))
    return cls(**values)


def parse_config(cls: type[T], argv: Sequence[str], env: Mapping[str, str], prog: str | None = None) -> T:
    """Parses `argv` and `env` into an instance of the config dataclass `cls`."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(list(argv)), env)


def _base_type(hint: Any) -> type:
    """`int | None` -> int; `Path` -> Path."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _converter(kind: type):
    return kind if kind in (int, float, str, Path) else str


def _parse_env(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(name)}={raw!r} is not a boolean; use true or false")
    try:
        return _converter(kind)(raw)
    except ValueError as e:
        raise ValueError(f"{env_name(name)}={raw!r} is not a valid {kind.__name__}") from e


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def grpc_port_field(default: int) -> Any:
    """The `grpc_port` field with a service's own default (the help text is the same for all)."""
    return field(default=default, metadata={"help": "gRPC port; 0 picks a free one."})


def metrics_port_field(default: int) -> Any:
    """The `metrics_port` field with a service's own default."""
    return field(default=default, metadata={"help": "Prometheus metrics HTTP port (0: any free, -1: off)."})


@dataclass
class ServiceConfig:
    """Settings every service shares, with one default each; the service configs inherit them.

    Ports are the exception that proves the rule: each service redeclares `grpc_port` and `metrics_port`
    with a default of its own, so the three can run on one machine (inference 50051/9101, trainer
    50052/9102, reward 50053/9103).
    """

    kafka_bootstrap: str = field(default="127.0.0.1:19092", metadata={"help": "Kafka bootstrap servers."})
    topic_prefix: str = field(default="rlhf", metadata={"help": "Prefix of the Kafka topic names."})
    registry_dir: str = field(default=".rlhf/registry", metadata={"help": "Model registry root folder."})
    device: str = field(
        default="auto", metadata={"help": "torch device: auto (cuda if present), cpu, cuda, cuda:1."}
    )
    torch_threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads (0: torch's default, all cores). More threads than free cores slows "
            "torch down a lot, so 1 is the default where the services share a machine."
        },
    )
    grpc_host: str = field(
        default="127.0.0.1", metadata={"help": "Address the gRPC server binds (0.0.0.0 in a pod)."}
    )
    grpc_port: int = grpc_port_field(0)
    tls_cert_file: str = field(
        default="",
        metadata={
            "help": "PEM certificate (chain) of the gRPC server; with tls_key_file turns TLS on. Empty: "
            "plaintext (docs/security.md)."
        },
    )
    tls_key_file: str = field(default="", metadata={"help": "PEM private key of tls_cert_file."})
    tls_client_ca_file: str = field(
        default="",
        metadata={
            "help": "PEM CA bundle; set: mutual TLS, every client must present a certificate it signed."
        },
    )
    metrics_port: int = metrics_port_field(-1)
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR."})

    def torch_device(self) -> str:
        """`device` with "auto" resolved: "cuda" when torch sees a GPU, else "cpu"."""
        if self.device != "auto":
            return self.device
        import torch  # here, not at the top: config modules stay cheap to import

        return "cuda" if torch.cuda.is_available() else "cpu"

    def apply_torch_threads(self) -> None:
        """Sets torch's CPU thread count when `torch_threads` > 0 (call once, at start-up)."""
        if self.torch_threads > 0:
            import torch

            torch.set_num_threads(self.torch_threads)
