"""TGI's HTTP API in front of ChatService, so apps built on Hugging Face's `text-generation` client (0.7.0)
work unchanged against rlhf-online.

    POST /generate         {"inputs", "parameters"} -> {"generated_text", "details"}
    POST /generate_stream  server-sent events: one `data:{"token", ...}` per piece of text; the last one also
                           carries "generated_text" and "details" (no `data: [DONE]` line)
    POST /                 the route the client calls: `stream` decides; the plain answer is a one-item list
    GET  /info             the served model, its version (`model_sha`, `model_version`) and its limits
    GET  /health           200 while serving; 503 {"error": "unhealthy", "error_type": "healthcheck"} after
    POST /feedback         {"response_id", "rating": "THUMBS_UP"|"THUMBS_DOWN", "user_id", "comment"?}, the
                           HTTP form of SubmitFeedback -> {"event_id"}

An answer takes the path of a ChatStream (`ChatService.complete`): the same engine, limits, signed
response id, Interaction event and metrics. As in TGI, `inputs` is the prompt exactly as the model sees it:
no chat template is applied. The end user's id goes in an `x-user-id` request header (the client's
`headers=`).
A plain answer is tagged with `x-response-id` and `x-model-version` headers; a streamed one with the fields
"response_id" and "model_version" of its last event, since the headers leave before the version is known.

With `tls_cert_file` and `tls_key_file` set the port speaks HTTPS with the gRPC port's certificate, and with
`tls_client_ca_file` it asks every client for a certificate from that CA, as gRPC does.

Errors are TGI's {"error", "error_type"}: 422 validation, 429 overloaded (503 while the engine stops),
424 generation; an answer that breaks off while streaming ends with an error event instead. Parameters this
engine cannot honour (stop sequences, top_k, typical_p, penalties, best_of > 1, grammar, truncate, watermark)
are refused with 422 naming the parameter, rather than silently ignored.
"""

import contextlib
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

import rlhf_online
from rlhf_online.contract import POLICY
from rlhf_online.engine.engine import SamplingParams, TextDelta
from rlhf_online.inference.chat import ChatService
from rlhf_online.inference.validation import ChatLimits, RequestError, check_user_id, invalid
from rlhf_online.proto.rlhf.v1 import chat_pb2

log = logging.getLogger(__name__)

USER_HEADER = "x-user-id"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FINISH_REASONS = {"stop": "eos_token", "length": "length"}  # the engine's -> TGI's
# gRPC status of a refused request -> (HTTP status, TGI error_type) before the answer starts.
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation"),
    grpc.StatusCode.FAILED_PRECONDITION: (422, "validation"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "validation"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "overloaded"),
    grpc.StatusCode.INTERNAL: (424, "generation"),
}
# Parameters TGI knows and this engine cannot honour, with the value that means "off".
_UNSUPPORTED = {
    "top_k": None,
    "typical_p": None,
    "truncate": None,
    "top_n_tokens": None,
    "grammar": None,
    "repetition_penalty": (None, 1.0),
    "frequency_penalty": (None, 0.0),
    "watermark": (None, False),
    "best_of": (None, 1),
    "stop": (None, []),
}
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class TgiRequest:
    """A checked TGI generate request."""

    inputs: str
    params: SamplingParams
    stream: bool
    details: bool
    decoder_input_details: bool
    return_full_text: bool


def parse_request(body: Any, limits: ChatLimits, *, stream: bool | None = None) -> TgiRequest:
    """Checks a TGI request body (`stream` given by the route, or read from the body for `POST /`).

    Sampling follows TGI: greedy unless `do_sample` is true or `temperature` / `top_p` change the
    distribution. Raises RequestError (INVALID_ARGUMENT) naming the field and what to change.
    """
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object like {"inputs": "...", "parameters": {...}}')
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise invalid("`inputs` must be a non-empty string: the prompt text")
    if len(inputs) > limits.max_content_chars:
        raise invalid(f"`inputs` is {len(inputs)} characters; the limit is {limits.max_content_chars}")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid("`parameters` must be a JSON object")
    _refuse_unsupported(parameters)
    streaming = _flag(body, "stream") if stream is None else stream
    input_details = _flag(parameters, "decoder_input_details")
    if streaming and input_details:
        raise invalid("`decoder_input_details` is not supported when streaming; set it to false")
    return TgiRequest(
        inputs=inputs,
        params=_sampling(parameters, limits),
        stream=streaming,
        details=_flag(parameters, "details"),
        decoder_input_details=input_details,
        return_full_text=_flag(parameters, "return_full_text"),
    )


def _refuse_unsupported(parameters: dict) -> None:
    for name, off in _UNSUPPORTED.items():
        value = parameters.get(name)
        if value not in (off if isinstance(off, tuple) else (off,)):
            raise invalid(
                f"`{name}` is not supported by this server (got {value!r}); remove it from the parameters"
            )


def _sampling(parameters: dict, limits: ChatLimits) -> SamplingParams:
    """TGI's sampling parameters -> the engine's, with this server's defaults and caps."""
    max_new = parameters.get("max_new_tokens")
    max_new = limits.default_max_new_tokens if max_new is None else max_new
    if not _is_int(max_new) or not 1 <= max_new <= limits.max_new_tokens_cap:
        raise invalid(
            f"`max_new_tokens` is {max_new!r}; use an integer from 1 to {limits.max_new_tokens_cap}"
        )
    temperature = _optional_number(parameters, "temperature", lambda t: t > 0, "a number > 0")
    top_p = _optional_number(parameters, "top_p", lambda p: 0 < p <= 1, "a number in (0, 1]")
    seed = parameters.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= _MAX_SEED):
        raise invalid(f"`seed` is {seed!r}; use an integer from 0 to 2**64 - 1")
    sample = (
        _flag(parameters, "do_sample")
        or (temperature is not None and temperature != 1.0)
        or (top_p is not None and top_p < 1.0)
    )
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=(temperature or 1.0) if sample else 0.0,
        top_p=top_p or 1.0,
        seed=seed,
    )


def _optional_number(parameters: dict, name: str, ok: Callable[[float], bool], wanted: str) -> float | None:
    value = parameters.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise invalid(f"`{name}` is {value!r}; use {wanted}, or leave it out")
    return float(value)


def _flag(mapping: dict, name: str) -> bool:
    value = mapping.get(name, False)
    if not isinstance(value, bool):
        raise invalid(f"`{name}` is {value!r}; use true or false")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt given as text, with special tokens added exactly when the engine's
    `encode_chat` adds them (no chat template), so a rendered chat prompt encodes as it did there."""
    return tokenizer.encode(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, prompt_ids: list[int]) -> str:
    """The inverse of `encode_prompt`: the text a TGI server must be sent to see these ids again."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer.decode(prompt_ids, skip_special_tokens=not has_template)


def local_model_info(device: str) -> dict[str, str]:
    """/info's model fields for the in-process engine on `device` (dtypes as `load_policy` picks them)."""
    kind = device.split(":")[0]
    return {
        "model_id": f"rlhf-online/{POLICY}",
        "model_dtype": "torch.bfloat16" if kind == "cuda" else "torch.float32",
        "model_device_type": kind,
    }


def server_ssl_context(settings) -> ssl.SSLContext | None:
    """HTTPS from the TLS settings of the service config (checked already by `tls.server_credentials`);
    None when TLS is off."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _HttpContext:
    """What ChatService uses of a grpc.aio context, for a call that came over HTTP: `abort` raises the
    RequestError that the route turns into TGI's error format."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RequestError(code, details)

    def time_remaining(self) -> float | None:
        return None  # HTTP carries no deadline; the server's own timeouts apply

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((k.lower(), v) for k, v in self._headers.items())

    def peer(self) -> str:
        return "http"


class TgiHttp:
    """The TGI routes of one ChatService, served by aiohttp on a port of their own."""

    def __init__(
        self,
        chat: ChatService,
        model_info: Mapping[str, str],
        *,
        max_concurrent_requests: int,
        max_batch_size: int,
        health_check: Callable[[], Awaitable[bool]] | None = None,
        shutdown_grace_s: float = 10.0,
    ) -> None:
        """`model_info`: model_id, model_dtype, model_device_type for /info; `health_check`: an extra check
        for /health (the remote server of the TGI backend)."""
        self.chat, self.engine = chat, chat.engine
        self._static_info = {
            **model_info,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": max_concurrent_requests,
            "max_batch_size": max_batch_size,
        }
        self._health_check = health_check
        self._grace_s = shutdown_grace_s
        self._runner: web.AppRunner | None = None
        self.serving = False

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/generate", self._generate),
                web.post("/generate_stream", self._generate_stream),
                web.post("/", self._compat),
                web.get("/info", self._info),
                web.get("/health", self._health),
                web.post("/feedback", self._feedback),
            ]
        )
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serves on host:port (0: a free port), over HTTPS with `ssl_context`; returns the port."""
        # A client that hangs up cancels its handler, so its row leaves the batch as with gRPC.
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=self._grace_s
        )
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(f"cannot bind the TGI HTTP port {host}:{port}: {e}; is it taken?") from e
        self.serving = True
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stops listening; answers in flight get the shutdown grace to finish (meanwhile /health answers
        503 on connections still open)."""
        self.serving = False
        if self._runner is not None:
            await self._runner.cleanup()

    # Routes.

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, stream=False, as_list=False)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, stream=True, as_list=False)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, stream=None, as_list=True)

    async def _info(self, _request: web.Request) -> web.Response:
        context = self.engine.context_length
        return web.json_response(
            {
                **self._static_info,
                "model_sha": self.engine.version,
                "model_version": self.engine.version,
                "max_best_of": 1,
                "max_stop_sequences": 0,
                "max_input_tokens": context - 1,
                "max_input_length": context - 1,
                "max_total_tokens": context,
                "max_client_batch_size": 1,
                "validation_workers": 1,
                "router": "rlhf-online",
                "version": rlhf_online.__version__,
                "sha": None,
                "docker_label": None,
            }
        )

    async def _health(self, _request: web.Request) -> web.Response:
        healthy = self.serving and (self._health_check is None or await self._health_check())
        if healthy:
            return web.Response(status=200)
        return _error(503, "unhealthy", "healthcheck")

    async def _feedback(self, request: web.Request) -> web.Response:
        try:
            rating = _feedback_request(await _json_body(request))
            reply = await self.chat.SubmitFeedback(rating, _HttpContext(request.headers))
        except RequestError as e:
            return _refusal(e)
        return web.json_response({"event_id": reply.event_id})

    # Answers.

    async def _answer(
        self, request: web.Request, *, stream: bool | None, as_list: bool
    ) -> web.StreamResponse:
        """Checks the request, then answers it whole or as server-sent events."""
        try:
            parsed = parse_request(await _json_body(request), self.chat.limits, stream=stream)
            user_id = request.headers.get(USER_HEADER, "")
            check_user_id(user_id, self.chat.config.max_user_id_chars, required=False)
            prompt_ids = encode_prompt(self.engine.tokenizer, parsed.inputs)
            if not prompt_ids:
                raise invalid("`inputs` encodes to no tokens; send some text")
        except RequestError as e:
            return _refusal(e)
        chat_request = chat_pb2.ChatRequest(user_id=user_id)
        method = "TGI/generate_stream" if parsed.stream else "TGI/generate"
        answer = self.chat.complete(
            chat_request, parsed.inputs, prompt_ids, parsed.params, _HttpContext(request.headers), method
        )
        async with contextlib.aclosing(answer):
            if parsed.stream:
                return await self._stream(request, parsed, prompt_ids, answer)
            return await self._whole(parsed, prompt_ids, answer, as_list)

    async def _whole(
        self, parsed: TgiRequest, prompt_ids, answer: AsyncIterator, as_list: bool
    ) -> web.Response:
        tokens, last = [], None
        try:
            async for item in answer:
                if isinstance(item, TextDelta):
                    tokens.append(self._token(item.text))
                else:
                    last = item
        except RequestError as e:
            return _refusal(e)
        if last is None:
            return _error(500, "the answer ended before it was complete; retry", "incomplete_generation")
        if last.finish_reason == "stop":
            tokens.append(self._end_token(last))
        text = "".join(t["text"] for t in tokens if not t["special"])
        body: dict[str, Any] = {"generated_text": parsed.inputs + text if parsed.return_full_text else text}
        if parsed.details:
            body["details"] = {
                **self._details(parsed, last),
                "prefill": self._prefill(prompt_ids) if parsed.decoder_input_details else [],
                "tokens": tokens,
                "top_tokens": None,
                "best_of_sequences": None,
            }
        headers = {
            "x-response-id": last.response_id,
            "x-model-version": last.model_version,
            "x-prompt-tokens": str(last.usage.prompt_tokens),
            "x-generated-tokens": str(last.usage.completion_tokens),
        }
        return web.json_response([body] if as_list else body, headers=headers)

    async def _stream(
        self, request: web.Request, parsed: TgiRequest, prompt_ids, answer
    ) -> web.StreamResponse:
        """Server-sent events. The first item is awaited before the headers go out, so a request refused at
        the start still gets a plain HTTP error."""
        try:
            item = await anext(answer)
        except RequestError as e:
            return _refusal(e)
        except StopAsyncIteration:
            return _error(500, "the answer ended before it was complete; retry", "incomplete_generation")
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        text, index = [], 0
        try:
            while isinstance(item, TextDelta):
                index += 1
                text.append(item.text)
                await response.write(_sse(self._token_event(index, item.text)))
                item = await anext(answer)
            generated = parsed.inputs + "".join(text) if parsed.return_full_text else "".join(text)
            await response.write(_sse(self._last_event(parsed, item, index + 1, generated, len(prompt_ids))))
        except RequestError as e:
            await response.write(_sse(_stream_error(e)))
        except StopAsyncIteration:
            error = {
                "error": "the answer ended before it was complete",
                "error_type": "incomplete_generation",
            }
            await response.write(_sse(error))
        await response.write_eof()
        return response

    def _token_event(self, index: int, text: str) -> dict:
        return {"index": index, "token": self._token(text), "top_tokens": None, "generated_text": None,
                "details": None}  # fmt: skip

    def _last_event(self, parsed: TgiRequest, last, index: int, generated: str, input_length: int) -> dict:
        details = {**self._details(parsed, last), "input_length": input_length} if parsed.details else None
        return {
            "index": index,
            "token": self._end_token(last),
            "top_tokens": None,
            "generated_text": generated,
            "details": details,
            "response_id": last.response_id,
            "model_version": last.model_version,
        }

    def _details(self, parsed: TgiRequest, last) -> dict:
        sampled = parsed.params.temperature > 0
        return {
            "finish_reason": _FINISH_REASONS.get(last.finish_reason, "eos_token"),
            "generated_tokens": last.usage.completion_tokens,
            "seed": parsed.params.seed if sampled else None,
        }

    def _token(self, text: str) -> dict:
        """A streamed piece of text as a TGI token. The engine streams text, not ids: the id is the one token
        the text encodes to, or -1 when it is not exactly one token."""
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return {"id": ids[0] if len(ids) == 1 else -1, "text": text, "logprob": None, "special": False}

    def _end_token(self, last) -> dict:
        """The token that ends an answer: the eos token for "stop"; for "length", a marker with no text."""
        eos = self.engine.tokenizer.eos_token_id
        token_id = eos if last.finish_reason == "stop" and eos is not None else -1
        return {"id": token_id, "text": "", "logprob": None, "special": True}

    def _prefill(self, prompt_ids: list[int]) -> list[dict]:
        decode = self.engine.tokenizer.decode
        return [{"id": i, "text": decode([i]), "logprob": None} for i in prompt_ids]


def _feedback_request(body: Any) -> chat_pb2.FeedbackRequest:
    """The JSON of a rating -> FeedbackRequest; SubmitFeedback checks the rest."""
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object like {"response_id", "rating", "user_id"}')
    fields = {name: body.get(name) for name in ("response_id", "user_id", "comment")}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise invalid(f"`{name}` must be a string")
    rating = body.get("rating")
    if rating not in ("THUMBS_UP", "THUMBS_DOWN"):
        raise invalid(f'`rating` is {rating!r}; use "THUMBS_UP" or "THUMBS_DOWN"')
    return chat_pb2.FeedbackRequest(
        response_id=fields["response_id"] or "",
        rating=chat_pb2.Rating.Value(rating),
        user_id=fields["user_id"] or "",
        comment=fields["comment"],
    )


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge as e:
        raise invalid(f"the body is larger than {request.client_max_size} bytes") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the body is not valid JSON: {e}") from e


def _refusal(error: RequestError) -> web.Response:
    status, kind = _REFUSALS.get(error.code, (500, "generation"))
    return _error(status, error.message, kind)


def _stream_error(error: RequestError) -> dict:
    """An error that breaks off a started stream: it is incomplete unless the engine itself failed."""
    kind = "generation" if error.code == grpc.StatusCode.INTERNAL else "incomplete_generation"
    return {"error": error.message, "error_type": kind}


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": message, "error_type": error_type}, status=status)


def _sse(payload: dict) -> bytes:
    return b"data:" + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
