"""Config dataclasses become flags and RLHF_* environment variables; flags win over env, env over defaults."""

from dataclasses import dataclass, field

import pytest

from rlhf_online.config import env_names, parse_config


@dataclass
class Example:
    """An example config."""

    kafka_bootstrap: str = field(default="a:1", metadata={"help": "Brokers."})
    partitions: int = field(default=4, metadata={"help": "Partitions."})
    rate: float = field(default=0.5, metadata={"help": "Rate."})
    follow: bool = field(default=True, metadata={"help": "Follow."})
    model_dir: str | None = field(default=None, metadata={"help": "Model."})


def test_defaults():
    assert parse_config(Example, [], {}) == Example()


def test_env_then_flags():
    env = {"RLHF_KAFKA_BOOTSTRAP": "b:2", "RLHF_PARTITIONS": "8", "RLHF_FOLLOW": "false", "RLHF_RATE": "0.25"}
    assert parse_config(Example, [], env) == Example("b:2", 8, 0.25, False, None)
    flags = ["--kafka-bootstrap", "c:3", "--follow", "--model-dir", "/m"]
    assert parse_config(Example, flags, env) == Example("c:3", 8, 0.25, True, "/m")


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="RLHF_PARTITIONS='many' is not a valid int"):
        parse_config(Example, [], {"RLHF_PARTITIONS": "many"})
    with pytest.raises(ValueError, match="RLHF_FOLLOW='maybe' is not a boolean"):
        parse_config(Example, [], {"RLHF_FOLLOW": "maybe"})


def test_unrelated_env_is_ignored_and_names_are_listed():
    assert parse_config(Example, [], {"RLHF_UNKNOWN": "x", "HOME": "/"}) == Example()
    assert env_names(Example) == {
        "RLHF_KAFKA_BOOTSTRAP",
        "RLHF_PARTITIONS",
        "RLHF_RATE",
        "RLHF_FOLLOW",
        "RLHF_MODEL_DIR",
    }


def test_help_lists_env_names(capsys):
    with pytest.raises(SystemExit):
        parse_config(Example, ["--help"], {})
    out = capsys.readouterr().out
    assert "--kafka-bootstrap" in out and "RLHF_KAFKA_BOOTSTRAP" in out
