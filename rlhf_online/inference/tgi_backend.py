"""`--backend tgi`: a remote TGI-compatible server generates; signing, events, feedback, limits and metrics
stay in rlhf-online.

    rlhf-online serve-inference --backend tgi --tgi-url http://tgi:8080 --base-model-dir /models/policy

ChatService drives a TgiBackend as it drives the in-process PolicyEngine (`tokenizer`, `context_length`,
`encode_chat`, `submit` -> a stream of TextDelta..., Finished; `version`). A prompt is rendered and checked
here, with the tokenizer of `base_model_dir` (it must be the remote model's), then sent as text through
Hugging Face's `text_generation.AsyncClient`; the tokens it streams back become TextDeltas.

The model version is read from the remote's /info: the `model_version` of an rlhf-online front end, else
`model_id` and `model_sha` (made to fit a response id). It is read at start and again, in the background, at
most every `refresh_s` while requests come; an answer carries the version last read when it was sent, so
right after the remote swapped weights a few answers may still name the old one. Swapping the remote's
weights is the job of that server's deployment (a rolling restart of TGI): in this mode the models-topic
follower and ModelAdmin are off.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
from prometheus_client import Counter
from text_generation import AsyncClient
from text_generation.errors import OverloadedError
from transformers import AutoTokenizer

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.engine import (
    MODEL_VERSION,
    EngineStopped,
    Finished,
    QueueFull,
    SamplingParams,
    TextDelta,
)
from rlhf_online.engine.sampling import check_fits
from rlhf_online.inference.tgi_http import encode_prompt, prompt_text

log = logging.getLogger(__name__)

REMOTE_FAILURES = Counter(
    "rlhf_inference_tgi_backend_failures_total",
    "Requests to the TGI backend that failed, by kind (unavailable: retry later; failed: the remote erred).",
    ["kind"],
)
_FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}  # TGI's -> the engine's
_NOT_IN_VERSION = re.compile(r"[^A-Za-z0-9_\-]+")
_MAX_VERSION_CHARS = 64  # what a signed response id can carry


def remote_version(info: dict) -> str:
    """The version an answer of the remote server carries, from its /info."""
    if info.get("model_version"):
        version = str(info["model_version"])
    else:
        sha = info.get("model_sha") or ""
        version = f"{info.get('model_id') or 'tgi'}-{sha[:12]}" if sha else str(info.get("model_id") or "tgi")
    return _NOT_IN_VERSION.sub("-", version).strip("-")[:_MAX_VERSION_CHARS] or "tgi"


async def fetch_info(url: str, timeout_s: float) -> dict:
    """GET {url}/info; raises ConnectionError saying what to check."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(f"{url}/info") as response,
        ):
            response.raise_for_status()
            info = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise ConnectionError(
            f"cannot read {url}/info ({type(e).__name__}: {e}); start the TGI server or fix --tgi-url"
        ) from e
    if not isinstance(info, dict):
        raise ConnectionError(f"{url}/info did not answer a JSON object; is --tgi-url a TGI server?")
    return info


class TgiBackend:
    """Generation by a remote TGI-compatible server, with the PolicyEngine surface that ChatService uses."""

    def __init__(
        self,
        url: str,
        tokenizer,
        info: dict,
        *,
        timeout_s: float,
        max_in_flight: int,
        refresh_s: float = 10.0,
    ) -> None:
        """`info`: the remote's /info; `max_in_flight`: requests sent at once, beyond which QueueFull."""
        self.url, self.tokenizer, self.timeout_s = url.rstrip("/"), tokenizer, timeout_s
        self.model_id = str(info.get("model_id") or "tgi")
        self.model_dtype = str(info.get("model_dtype") or "unknown")
        self.device_type = str(info.get("model_device_type") or "unknown")
        self.context_length = int(info.get("max_total_tokens") or tokenizer.model_max_length)
        self.max_in_flight, self.refresh_s = max_in_flight, refresh_s
        self.in_flight = 0
        self._version = ""
        self._set_version(remote_version(info))
        self._checked_at = time.monotonic()
        self._refreshing: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @classmethod
    async def connect(
        cls, url: str, tokenizer_dir: str, *, timeout_s: float, max_in_flight: int
    ) -> "TgiBackend":
        """Reads the remote's /info and loads the tokenizer; raises ConnectionError if the remote is away."""
        info = await fetch_info(url.rstrip("/"), min(timeout_s, 30.0))
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, tokenizer_dir)
        backend = cls(url, tokenizer, info, timeout_s=timeout_s, max_in_flight=max_in_flight)
        backend._loop = asyncio.get_running_loop()
        log.info(
            "generation by the TGI server at %s: %s (version %s)", url, backend.model_id, backend.version
        )
        return backend

    @property
    def version(self) -> str:
        """The remote's model version as last read from its /info."""
        return self._version

    def model_info(self) -> dict[str, str]:
        """The /info model fields of an rlhf-online front end that serves this backend."""
        return {
            "model_id": self.model_id,
            "model_dtype": self.model_dtype,
            "model_device_type": self.device_type,
        }

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Prompt token ids for a conversation, as PolicyEngine.encode_chat makes them."""
        return encode_prompt(self.tokenizer, render_prompt(self.tokenizer, messages))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "RemoteStream":
        """A stream for one answer; the request is sent when the stream is first read. Call on the loop.

        Raises:
            QueueFull: `max_in_flight` requests are already out.
            EngineStopped: the backend is stopping.
            ValueError: empty prompt, or prompt plus max_new_tokens longer than the context.
        """
        check_fits(prompt_ids, params.max_new_tokens, self.context_length)
        if self._stopping:
            raise EngineStopped("the TGI backend is stopping; retry on another replica")
        if self.in_flight >= self.max_in_flight:
            raise QueueFull(
                f"{self.in_flight} requests are already out to the TGI server (max_batch_size + max_queue = "
                f"{self.max_in_flight}); retry later or add replicas"
            )
        self._maybe_refresh()
        self.in_flight += 1
        return RemoteStream(self, prompt_text(self.tokenizer, prompt_ids), len(prompt_ids), params)

    async def healthy(self) -> bool:
        """Whether the remote answers GET /health with 200 (for the front end's /health)."""
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, 5.0))
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"{self.url}/health") as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Refuses new requests; answers already streaming finish on their own. Thread-safe."""
        self._stopping = True
        task, loop = self._refreshing, self._loop
        if task is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(task.cancel)

    def _release(self) -> None:
        self.in_flight -= 1

    def _maybe_refresh(self) -> None:
        if self._refreshing is None and time.monotonic() - self._checked_at >= self.refresh_s:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._set_version(remote_version(await fetch_info(self.url, min(self.timeout_s, 10.0))))
        except ConnectionError as e:
            log.warning("keeping version %s: %s", self._version, e)
        finally:
            self._checked_at, self._refreshing = time.monotonic(), None

    def _set_version(self, version: str) -> None:
        if version == self._version:
            return
        if self._version:
            log.info("the TGI server now serves %s (was %s)", version, self._version)
            with contextlib.suppress(KeyError):
                MODEL_VERSION.remove(self._version)
        MODEL_VERSION.labels(version).set(1)
        self._version = version


class RemoteStream:
    """One answer from the remote server, read like a GenerationStream: `async for event in stream` yields
    TextDelta... then one Finished; `cancel()` hangs up (the remote drops the request with the connection).
    Remote failures surface as EngineStopped (unreachable, overloaded, timed out: retry later) or
    RuntimeError (the remote refused or failed the request)."""

    def __init__(self, backend: TgiBackend, prompt: str, prompt_tokens: int, params: SamplingParams) -> None:
        self.prompt_tokens = prompt_tokens
        self._backend, self._prompt, self._params = backend, prompt, params
        self._version = backend.version  # the version this answer will say generated it
        self._events: AsyncIterator[TextDelta | Finished] | None = None
        self._cancelled = self._released = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> TextDelta | Finished:
        if self._cancelled:
            raise StopAsyncIteration
        if self._events is None:
            self._events = self._run()
        return await anext(self._events)

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._events is not None:
            asyncio.get_running_loop().create_task(_close(self._events))
        self._release()

    async def _run(self) -> AsyncIterator[TextDelta | Finished]:
        backend = self._backend
        client = AsyncClient(backend.url, timeout=backend.timeout_s)
        try:
            async for response in client.generate_stream(self._prompt, **_remote_parameters(self._params)):
                if not response.token.special and response.token.text:
                    yield TextDelta(response.token.text)
                if response.details is not None:
                    yield self._finished(response)
                    return
        except (OverloadedError, aiohttp.ClientError, TimeoutError) as e:
            REMOTE_FAILURES.labels("unavailable").inc()
            raise EngineStopped(
                f"the TGI server at {backend.url} is unavailable ({_describe(e)}); retry later"
            ) from e
        except Exception as e:  # any other failure is the remote's: a refusal, a generation error, bad data
            REMOTE_FAILURES.labels("failed").inc()
            raise RuntimeError(f"the TGI server at {backend.url} failed the request: {_describe(e)}") from e
        finally:
            self._release()
        REMOTE_FAILURES.labels("failed").inc()
        raise RuntimeError(f"the TGI server at {backend.url} ended the answer without its details")

    def _finished(self, response) -> Finished:
        details = response.details
        return Finished(
            text=response.generated_text or "",
            model_version=self._version,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=details.generated_tokens,
            finish_reason=_FINISH_REASONS.get(details.finish_reason.value, "stop"),
        )

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._backend._release()


def _remote_parameters(params: SamplingParams) -> dict:
    """The engine's sampling settings as generate_stream takes them (it refuses temperature 0, top_p 1)."""
    sample = params.temperature > 0
    return {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": sample,
        "temperature": params.temperature if sample else None,
        "top_p": params.top_p if sample and params.top_p < 1 else None,
        "seed": params.seed if sample else None,
    }


async def _close(events) -> None:
    with contextlib.suppress(RuntimeError):  # still running: it ends on its own
        await events.aclose()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
