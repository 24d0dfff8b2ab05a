"""Registers a grpc.aio servicer so that request bytes that do not parse get INVALID_ARGUMENT, not UNKNOWN.

The generated `add_*Servicer_to_server` functions deserialize with `Message.FromString`, which raises
`DecodeError` on malformed bytes; grpc.aio then answers UNKNOWN ("Unexpected <class ...DecodeError>") and
logs a full traceback for every such request, a log flood anyone can trigger. Here the deserializer never
raises: it returns a `MalformedRequest` marker, and the method's wrapper refuses it with INVALID_ARGUMENT and
a short message, counts it, and logs at most one line every few seconds. The generated stubs stay untouched;
the method table comes from the service descriptor:

    add_servicer(server, ChatService(...), chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from prometheus_client import Counter

log = logging.getLogger(__name__)

MALFORMED = Counter(
    "rlhf_grpc_malformed_requests_total",
    "Requests refused with INVALID_ARGUMENT because their bytes are not a valid message, by method.",
    ["method"],
)
_MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class MalformedRequest:
    """What the safe deserializer returns in place of a message it could not parse."""

    reason: str


class RateLimitedLog:
    """Logs at most one line per `interval_s`; the next line says how many were left out meanwhile."""

    def __init__(
        self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger, self._interval_s, self._clock = logger, interval_s, clock
        self._next_at = -float("inf")
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Logs `msg % args` unless a line was logged less than `interval_s` ago; True if it logged."""
        now = self._clock()
        if now < self._next_at:
            self.suppressed += 1
            return False
        self._logger.warning(msg + " (%d more not logged since the last such line)", *args, self.suppressed)
        self.suppressed, self._next_at = 0, now + self._interval_s
        return True


_refusals = RateLimitedLog(log, interval_s=10.0)


def safe_deserializer(message_class: type) -> Callable[[bytes], object]:
    """`message_class.FromString` that returns a MalformedRequest instead of raising."""

    def deserialize(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except Exception as e:  # DecodeError: bad wire format or UTF-8; anything else is bad input too
            return MalformedRequest(str(e)[:_MAX_REASON_CHARS] or type(e).__name__)

    return deserialize


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Registers every method of `service` on `server`, served by the coroutine of the same name on
    `servicer`, with requests decoded by `safe_deserializer`."""
    handlers = {method.name: _method_handler(servicer, method) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _method_handler(servicer: object, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    if method.client_streaming:
        raise NotImplementedError(f"{method.full_name}: client-streaming methods are not supported here")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    behavior = getattr(servicer, method.name)
    options = dict(
        request_deserializer=safe_deserializer(request_class),
        response_serializer=response_class.SerializeToString,
    )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_guard_stream(behavior, method), **options)
    return grpc.unary_unary_rpc_method_handler(_guard_unary(behavior, method), **options)


def _guard_unary(behavior, method: MethodDescriptor):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, MalformedRequest):
            await _refuse(request, method, context)
        return await behavior(request, context)

    return handle


def _guard_stream(behavior, method: MethodDescriptor):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, MalformedRequest):
            await _refuse(request, method, context)
        async for response in behavior(request, context):
            yield response

    return handle


async def _refuse(request: MalformedRequest, method: MethodDescriptor, context) -> None:
    MALFORMED.labels(method.full_name).inc()
    _refusals.warning("malformed %s request from %s: %s", method.name, context.peer(), request.reason)
    expected = method.input_type
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request is not a valid {expected.full_name}: {request.reason}; encode it with the messages of "
        f"{expected.file.name}",
    )
