"""Typed records of the reward pipeline, converted from the Kafka protos at this one boundary."""

import json
from dataclasses import asdict, dataclass

from google.protobuf.message import DecodeError

from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2

# How far a record's own timestamp may run ahead of its Kafka record's: the join's stream time follows the
# former, so one record stamped in the far future would expire everything its partition holds.
MAX_AHEAD_MS = 60_000


class BadRecord(ValueError):
    """A Kafka record that cannot be used; the message becomes the dead letter's reason."""


def shorten(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters for a reason or a log line (ids come from the wire, of any length)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Interaction:
    """The part of a served response the reward model needs."""

    response_id: str
    prompt: str  # rendered prompt exactly as the policy saw it
    response: str
    model_version: str
    timestamp_ms: int


@dataclass(frozen=True)
class Feedback:
    """One accepted rating."""

    event_id: str
    response_id: str
    label: float  # 1.0 thumbs up, 0.0 thumbs down
    user_id: str
    model_version: str
    timestamp_ms: int


@dataclass(frozen=True)
class LabelledExample:
    """A rating joined with the response it rates: one training (or held-out) example."""

    event_id: str
    response_id: str
    prompt: str
    response: str
    label: float  # 1.0 thumbs up, 0.0 thumbs down
    model_version: str
    timestamp_ms: int  # of the rating

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "LabelledExample":
        return cls(**json.loads(line))


def join(interaction: Interaction, feedback: Feedback) -> LabelledExample:
    return LabelledExample(
        event_id=feedback.event_id,
        response_id=feedback.response_id,
        prompt=interaction.prompt,
        response=interaction.response,
        label=feedback.label,
        model_version=interaction.model_version,
        timestamp_ms=feedback.timestamp_ms,
    )


def parse_interaction(value: bytes | None, received_ms: int = -1) -> Interaction:
    """Decodes an `rlhf.interactions` record value (`received_ms`: its Kafka timestamp, -1 if none); raises
    BadRecord with the reason."""
    msg = _decode(events_pb2.Interaction, value)
    if not msg.response_id:
        raise BadRecord("interaction has no response_id")
    rid = shorten(msg.response_id)
    if not msg.prompt and not msg.response:
        raise BadRecord(f"interaction {rid} has neither prompt nor response text")
    _check_time(f"interaction {rid}", msg.timestamp_ms, received_ms)
    return Interaction(msg.response_id, msg.prompt, msg.response, msg.model_version, msg.timestamp_ms)


def parse_feedback(value: bytes | None, received_ms: int = -1) -> Feedback:
    """Decodes an `rlhf.feedback` record value (`received_ms`: its Kafka timestamp, -1 if none); raises
    BadRecord with the reason."""
    msg = _decode(events_pb2.FeedbackEvent, value)
    if not msg.event_id:
        raise BadRecord("feedback has no event_id")
    eid = shorten(msg.event_id)
    if not msg.response_id:
        raise BadRecord(f"feedback {eid} has no response_id")
    if msg.rating == chat_pb2.THUMBS_UP:
        label = 1.0
    elif msg.rating == chat_pb2.THUMBS_DOWN:
        label = 0.0
    else:
        raise BadRecord(f"feedback {eid} has rating {msg.rating}; expected THUMBS_UP or THUMBS_DOWN")
    _check_time(f"feedback {eid}", msg.timestamp_ms, received_ms)
    return Feedback(msg.event_id, msg.response_id, label, msg.user_id, msg.model_version, msg.timestamp_ms)


def _check_time(what: str, timestamp_ms: int, received_ms: int) -> None:
    ahead_ms = timestamp_ms - received_ms
    if received_ms >= 0 and ahead_ms > MAX_AHEAD_MS:
        raise BadRecord(
            f"{what} has timestamp_ms {timestamp_ms}, {ahead_ms / 1000:.0f}s ahead of its Kafka record's "
            f"({received_ms}); more than {MAX_AHEAD_MS // 1000}s ahead would move stream time past records "
            "still waiting to be joined. Stamp events with the producer's clock (now_ms())"
        )


def _decode(cls, value: bytes | None):
    if value is None:
        raise BadRecord(f"empty record value; expected a serialized {cls.DESCRIPTOR.full_name}")
    msg = cls()
    try:
        msg.ParseFromString(value)
    except DecodeError as e:
        raise BadRecord(f"cannot parse {cls.DESCRIPTOR.full_name}: {e}") from e
    return msg
