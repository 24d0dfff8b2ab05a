"""Checks of client requests. Each failure names the field, the limit and what to change (promise 6).

Validation happens before anything is queued or published, so a refused request changes nothing.
"""

import math
from dataclasses import dataclass

import grpc

from rlhf_online.engine.engine import SamplingParams
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.proto.rlhf.v1 import chat_pb2

ROLES = ("system", "user", "assistant")
# Below this, logits / temperature overflows float32 (found by tests/test_fuzz_grpc.py: 1e-45 made the sampler
# fail the whole batch); any temperature this low is greedy decoding in effect, which 0 asks for.
MIN_TEMPERATURE = 1e-4


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class ChatLimits:
    """The bounds a ChatRequest is checked against."""

    max_messages: int
    max_content_chars: int
    max_user_id_chars: int
    default_max_new_tokens: int
    max_new_tokens_cap: int
    default_temperature: float

    @classmethod
    def from_config(cls, config: InferenceConfig, context_length: int) -> "ChatLimits":
        # A character is at least one token with every tokenizer we serve, so the context bounds the text.
        return cls(
            max_messages=config.max_messages,
            max_content_chars=context_length * 8,
            max_user_id_chars=config.max_user_id_chars,
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_cap=config.max_new_tokens_cap,
            default_temperature=config.default_temperature,
        )


def chat_messages(request: chat_pb2.ChatRequest, limits: ChatLimits) -> list[tuple[str, str]]:
    """The conversation as (role, content) pairs, after checking roles, contents and the user id."""
    if not request.messages:
        raise invalid("messages is empty; send at least one message, e.g. {role: 'user', content: '...'}")
    if len(request.messages) > limits.max_messages:
        raise invalid(f"{len(request.messages)} messages is more than the limit of {limits.max_messages}")
    check_user_id(request.user_id, limits.max_user_id_chars, required=False)
    pairs = []
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid(f"messages[{i}].role is {_shown(message.role)}; use one of {', '.join(ROLES)}")
        if not message.content.strip():
            raise invalid(f"messages[{i}].content is empty; every message needs text")
        if len(message.content) > limits.max_content_chars:
            raise invalid(
                f"messages[{i}].content is {len(message.content)} characters; the limit is "
                f"{limits.max_content_chars}"
            )
        pairs.append((message.role, message.content))
    return pairs


def sampling_params(params: chat_pb2.GenerationParams, limits: ChatLimits) -> SamplingParams:
    """The request's sampling settings with server defaults filled in."""
    max_new = params.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens_cap:
        raise invalid(
            f"params.max_new_tokens is {max_new}; this server allows at most {limits.max_new_tokens_cap}"
        )
    temperature = params.temperature if params.HasField("temperature") else limits.default_temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid(f"params.temperature is {temperature}; use a finite number >= 0 (0 means greedy)")
    if 0 < temperature < MIN_TEMPERATURE:
        raise invalid(
            f"params.temperature is {temperature:g}; use 0 for greedy decoding or at least "
            f"{MIN_TEMPERATURE:g}"
        )
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid(f"params.top_p is {top_p}; use a number in (0, 1], or leave it unset for 1.0")
    seed = params.seed if params.HasField("seed") else None
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed)


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut at `limit` characters: a message never echoes a huge input."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    """Refuses a prompt that leaves no room for the answer within the model's context."""
    if prompt_tokens + max_new_tokens > context_length:
        raise invalid(
            f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, together more "
            f"than the model's context of {context_length} tokens; shorten the conversation or lower "
            "max_new_tokens"
        )


def check_user_id(user_id: str, max_chars: int, *, required: bool) -> None:
    if required and not user_id:
        raise invalid("user_id is empty; ratings need the id of the end user who gives them")
    if len(user_id) > max_chars:
        raise invalid(f"user_id is {len(user_id)} characters; the limit is {max_chars}")


def check_feedback(request: chat_pb2.FeedbackRequest, config: InferenceConfig) -> None:
    """Checks everything in a FeedbackRequest except the response id's signature."""
    if request.rating not in (chat_pb2.THUMBS_UP, chat_pb2.THUMBS_DOWN):
        name = (
            chat_pb2.Rating.Name(request.rating)
            if request.rating in chat_pb2.Rating.values()
            else request.rating
        )
        raise invalid(f"rating is {name}; use THUMBS_UP or THUMBS_DOWN")
    check_user_id(request.user_id, config.max_user_id_chars, required=True)
    if request.HasField("comment") and len(request.comment) > config.max_comment_chars:
        raise invalid(
            f"comment is {len(request.comment)} characters; the limit is {config.max_comment_chars}"
        )
