"""A synthetic rating stream with a hidden preference, for tests and throughput figures.

Users like enthusiastic answers: a response whose words end in "!" is rated up, one whose words end in "."
down (with `noise` of the labels flipped). A reward model that learns this gets held-out accuracy far above
0.5.
"""

import random

from rlhf_online.proto.rlhf.v1 import chat_pb2, events_pb2
from rlhf_online.reward.records import LabelledExample

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "runs",
    "fast",
    "slow",
    "blue",
    "red",
    "sky",
    "tree",
    "water",
    "stone",
    "light",
    "dark",
    "apple",
    "river",
    "cloud",
]


def synthetic_examples(n: int, seed: int = 0, noise: float = 0.0, prefix: str = "") -> list[LabelledExample]:
    """`n` labelled examples; prompts repeat, so up/down pairs on one prompt occur."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = f"<|user|>\nTell me about the {rng.choice(WORDS)}.\n<|assistant|>\n"
        liked = rng.random() < 0.5
        mark = "!" if liked else "."
        response = " ".join(rng.choice(WORDS) + mark for _ in range(rng.randint(3, 8)))
        label = float(liked != (rng.random() < noise))
        rid = f"{prefix}r{seed}-{i}"
        examples.append(
            LabelledExample(f"{rid}/u{i % 7}", rid, prompt, response, label, "policy-v0", 1000 + i)
        )
    return examples


def to_events(
    example: LabelledExample, timestamp_ms: int | None = None
) -> tuple[events_pb2.Interaction, events_pb2.FeedbackEvent]:
    """The Kafka payloads that join back into `example` (user_id taken from the event_id), stamped with
    `timestamp_ms` (default: the example's)."""
    user = example.event_id.rsplit("/", 1)[-1]
    ts = example.timestamp_ms if timestamp_ms is None else timestamp_ms
    interaction = events_pb2.Interaction(
        response_id=example.response_id,
        prompt=example.prompt,
        response=example.response,
        model_version=example.model_version,
        timestamp_ms=ts - 1,
        user_id=user,
        messages=[chat_pb2.Message(role="user", content=example.prompt)],
        finish_reason="stop",
    )
    feedback = events_pb2.FeedbackEvent(
        event_id=example.event_id,
        response_id=example.response_id,
        rating=chat_pb2.THUMBS_UP if example.label >= 0.5 else chat_pb2.THUMBS_DOWN,
        user_id=user,
        timestamp_ms=ts,
        model_version=example.model_version,
    )
    return interaction, feedback
