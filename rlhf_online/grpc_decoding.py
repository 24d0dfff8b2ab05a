"""Registers a grpc.aio servicer so that request bytes that do not parse get INVALID_ARGUMENT, not UNKNOWN.

The generated `add_*Servicer_to_server` functions deserialize with `Message.FromString`, which raises
`DecodeError` on malformed bytes; grpc.aio then answers UNKNOWN ("Unexpected <class ...DecodeError>") and
logs a full traceback for every such request, a log flood anyone can trigger. Here the deserializer never
raises: it returns a `MalformedRequest` marker, and the method's wrapper refuses it with INVALID_ARGUMENT and
a short message, counts it, and logs at most one line every few seconds. The generated stubs stay untouched;
the method table comes from the service descriptor:

    add_servicer(server, ChatService(...), chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
"""

import inspect
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
    """A handler of `method`; its behavior is the servicer's coroutine, or async generator for a stream
    (a method the servicer does not implement with either answers UNIMPLEMENTED)."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    behavior = getattr(servicer, method.name, None)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        behavior = _unimplemented(method)  # e.g. the generated base class's sync placeholder
    options = dict(
        request_deserializer=safe_deserializer(request_class),
        response_serializer=response_class.SerializeToString,
    )
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return make(_guarded(behavior, method), **options)


def _guarded(behavior, method: MethodDescriptor):
    """`behavior`, refusing a malformed request (or any malformed message of a request stream) first.

    A streaming response comes from an async generator, or from `context.write` in a coroutine (as the
    grpc.aio health servicer's Watch does); the wrapper has the same form as `behavior`."""

    def checked(request, context):
        return _checked_stream(request, method, context) if method.client_streaming else request

    if inspect.isasyncgenfunction(behavior):

        async def stream(request, context: grpc.aio.ServicerContext):
            if isinstance(request, MalformedRequest):
                await _refuse(request, method, context)
            async for response in behavior(checked(request, context), context):
                yield response

        return stream

    async def unary(request, context: grpc.aio.ServicerContext):
        if isinstance(request, MalformedRequest):
            await _refuse(request, method, context)
        return await behavior(checked(request, context), context)

    return unary


def _unimplemented(method: MethodDescriptor):
    async def unimplemented(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method.full_name} is not implemented here")

    return unimplemented


async def _checked_stream(requests, method: MethodDescriptor, context):
    async for request in requests:
        if isinstance(request, MalformedRequest):
            await _refuse(request, method, context)
        yield request


async def _refuse(request: MalformedRequest, method: MethodDescriptor, context) -> None:
    MALFORMED.labels(method.full_name).inc()
    _refusals.warning("malformed %s request from %s: %s", method.name, context.peer(), request.reason)
    expected = method.input_type
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request is not a valid {expected.full_name}: {request.reason}; encode it with the messages of "
        f"{expected.file.name}",
    )
