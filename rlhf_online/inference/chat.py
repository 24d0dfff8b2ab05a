"""`rlhf.v1.ChatService`: Chat, ChatStream and SubmitFeedback on grpc.aio.

Every answer comes from exactly one policy version (a row that started on a version finishes on it) and says
which; it is published to the interactions topic without blocking the caller. A rating is acknowledged only
after the broker stored it, and the Interaction of the answer it rates (when this process served that answer).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager

import grpc

from rlhf_online.contract import now_ms
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.engine import (
    EngineStopped,
    Finished,
    PolicyEngine,
    QueueFull,
    SamplingParams,
    TextDelta,
)
from rlhf_online.inference import metrics
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.events import PublishError
from rlhf_online.inference.limits import TokenBucket, VoteLedger
from rlhf_online.inference.signing import (
    InvalidResponseId,
    ResponseSigner,
    RetiredResponseId,
    feedback_event_id,
)
from rlhf_online.inference.validation import (
    ChatLimits,
    RequestError,
    chat_messages,
    check_feedback,
    check_prompt_fits,
    invalid,
    sampling_params,
)
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    """Serves the policy engine to client apps and takes their users' ratings."""

    def __init__(
        self, config: InferenceConfig, engine: PolicyEngine, events, signer: ResponseSigner, topics: Topics
    ) -> None:
        self.config, self.engine, self.events, self.signer, self.topics = (
            config,
            engine,
            events,
            signer,
            topics,
        )
        self.limits = ChatLimits.from_config(config, engine.context_length)
        self.rate_limit = TokenBucket(config.feedback_rate_per_s, config.feedback_burst)
        self.votes = VoteLedger()

    # Generates one complete answer.
    async def Chat(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatResponse:
        with _observed("Chat") as status:
            prepared = await self._prepare(request, context, status)
            async for event in self._generate(prepared, context, status):
                if isinstance(event, Finished):
                    response_id = self._publish_interaction(request, prepared, event)
                    return chat_pb2.ChatResponse(
                        response_id=response_id,
                        text=event.text,
                        model_version=event.model_version,
                        usage=_usage(event),
                        finish_reason=event.finish_reason,
                    )
            raise AssertionError("the engine ended a stream without a Finished event")

    # Streams an answer as it is generated; the last chunk carries the metadata.
    async def ChatStream(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatChunk]:
        with _observed("ChatStream") as status:
            prepared = await self._prepare(request, context, status)
            async for item in self._answer(request, prepared, context, status):
                yield chat_pb2.ChatChunk(text=item.text) if isinstance(item, TextDelta) else item

    async def complete(
        self,
        request: chat_pb2.ChatRequest,
        prompt: str,
        prompt_ids: list[int],
        params: SamplingParams,
        context,
        method: str,
    ) -> AsyncIterator[TextDelta | chat_pb2.ChatChunk]:
        """Continues a prompt given as text (TGI's `inputs`: no chat template), with the engine, limits,
        signing and events of ChatStream: TextDelta..., then the last ChatChunk (response id, version,
        usage). `request` holds what the Interaction records besides (user_id; messages may be empty);
        `context` needs `abort` like a grpc.aio context; `method` labels the metrics."""
        with _observed(method) as status:
            prepared = await self._submit(prompt, prompt_ids, params, context, status, request.user_id)
            async for item in self._answer(request, prepared, context, status):
                yield item

    # Records a rating once the broker has acknowledged it.
    async def SubmitFeedback(
        self, request: chat_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.FeedbackResponse:
        with _observed("SubmitFeedback") as status:
            try:
                check_feedback(request, self.config)
                verified = self.signer.verify(request.response_id)
            except RetiredResponseId as e:  # genuine but too old: retrying will not help
                await _abort(context, status, RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)))
            except InvalidResponseId as e:
                await _abort(context, status, invalid(str(e)))
            except RequestError as e:
                await _abort(context, status, e)
            wait_s = self.rate_limit.try_take(request.user_id)
            if wait_s:
                await _abort(
                    context,
                    status,
                    RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many ratings from user {request.user_id!r}; retry in {wait_s:.1f}s",
                    ),
                )
            if not self.votes.reserve(request.response_id, request.user_id):
                await _abort(
                    context,
                    status,
                    RequestError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"user {request.user_id!r} has already rated response {request.response_id}",
                    ),
                )
            event = _feedback_event(request, verified.model_version)
            try:
                await self._store(event, self._ack_timeout(context))
            except PublishError as e:
                self.votes.release(request.response_id, request.user_id)
                await _abort(
                    context,
                    status,
                    RequestError(grpc.StatusCode.UNAVAILABLE, f"the rating was not stored, retry later: {e}"),
                )
            self.votes.commit(request.response_id, request.user_id)
            metrics.FEEDBACK.labels(chat_pb2.Rating.Name(request.rating)).inc()
            return chat_pb2.FeedbackResponse(event_id=event.event_id)

    async def _store(self, event: events_pb2.FeedbackEvent, timeout_s: float) -> None:
        """Publishes a rating once the broker has its answer's Interaction (still in this process's outbox
        when the rating follows the answer at once), then waits for its ack; holds no thread (events.py).

        Raises:
            PublishError: either was not acknowledged within `timeout_s` (both waits together).
        """
        key = event.response_id.encode()
        deadline = time.monotonic() + timeout_s
        await self.events.wait_background(self.topics.interactions, key, timeout_s)
        left = max(0.05, deadline - time.monotonic())
        await self.events.publish_acked_async(self.topics.feedback, key, event.SerializeToString(), left)

    async def _prepare(self, request, context, status) -> "_Prepared":
        """Validates a ChatRequest and renders its prompt; aborts the RPC with a clear status if it is bad."""
        try:
            messages = chat_messages(request, self.limits)
            params = sampling_params(request.params, self.limits)
            prompt = render_prompt(self.engine.tokenizer, messages)
            prompt_ids = self.engine.encode_chat(messages)
        except RequestError as e:
            await _abort(context, status, e)
        return await self._submit(prompt, prompt_ids, params, context, status, request.user_id)

    async def _submit(self, prompt, prompt_ids, params, context, status, user_id: str = "") -> "_Prepared":
        """Queues a prompt if it fits the context; aborts with RESOURCE_EXHAUSTED or UNAVAILABLE if not.
        During a canary trial the in-process engine picks the version by a hash of `user_id`."""
        try:
            check_prompt_fits(len(prompt_ids), params.max_new_tokens, self.engine.context_length)
            if isinstance(self.engine, PolicyEngine):
                stream = self.engine.submit(prompt_ids, params, route_key=user_id or None)
            else:  # a remote backend serves one version
                stream = self.engine.submit(prompt_ids, params)
            return _Prepared(prompt, prompt_ids, params, stream)
        except RequestError as e:
            await _abort(context, status, e)
        except QueueFull as e:
            await _abort(context, status, RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))
        except EngineStopped as e:
            await _abort(context, status, RequestError(grpc.StatusCode.UNAVAILABLE, str(e)))

    async def _answer(self, request, prepared: "_Prepared", context, status):
        """The answer's TextDeltas, then its last ChatChunk once it is signed and published."""
        async for event in self._generate(prepared, context, status):
            if isinstance(event, TextDelta):
                yield event
            else:
                response_id = self._publish_interaction(request, prepared, event)
                yield chat_pb2.ChatChunk(
                    response_id=response_id,
                    model_version=event.model_version,
                    usage=_usage(event),
                    finish_reason=event.finish_reason,
                )

    async def _generate(self, prepared: "_Prepared", context, status) -> AsyncIterator[TextDelta | Finished]:
        """The engine's events; the request leaves its batch if the caller goes away."""
        finished = False
        try:
            async for event in prepared.stream:
                finished = isinstance(event, Finished)
                yield event
        except EngineStopped as e:
            await _abort(
                context, status, RequestError(grpc.StatusCode.UNAVAILABLE, f"generation stopped: {e}")
            )
        except RuntimeError as e:
            log.exception("generation failed")
            await _abort(context, status, RequestError(grpc.StatusCode.INTERNAL, str(e)))
        finally:
            if not finished:
                prepared.stream.cancel()

    def _publish_interaction(
        self, request: chat_pb2.ChatRequest, prepared: "_Prepared", done: Finished
    ) -> str:
        response_id = self.signer.issue(done.model_version)
        p = prepared.params
        interaction = events_pb2.Interaction(
            response_id=response_id,
            messages=request.messages,
            prompt=prepared.prompt,
            response=done.text,
            model_version=done.model_version,
            usage=_usage(done),
            finish_reason=done.finish_reason,
            params=chat_pb2.GenerationParams(
                max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed
            ),
            timestamp_ms=now_ms(),
            user_id=request.user_id,
        )
        self.events.publish_background(
            self.topics.interactions, response_id.encode(), interaction.SerializeToString()
        )
        return response_id

    def _ack_timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.config.feedback_ack_timeout_s
        return budget if remaining is None else max(0.05, min(budget, remaining - 0.05))


class _Prepared:
    """A validated request on its way through the engine."""

    def __init__(self, prompt: str, prompt_ids: list[int], params: SamplingParams, stream) -> None:
        self.prompt, self.prompt_ids, self.params, self.stream = prompt, prompt_ids, params, stream


class _Status:
    code: grpc.StatusCode = grpc.StatusCode.OK


@contextmanager
def _observed(method: str):
    """Counts the RPC by its final status code and times it."""
    status = _Status()
    start = time.perf_counter()
    try:
        yield status
    except asyncio.CancelledError:
        status.code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        if status.code == grpc.StatusCode.OK:
            status.code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
        raise
    finally:
        metrics.REQUESTS.labels(method, status.code.name).inc()
        metrics.LATENCY.labels(method).observe(time.perf_counter() - start)


async def _abort(context: grpc.aio.ServicerContext, status: _Status, error: RequestError) -> None:
    status.code = error.code
    await context.abort(error.code, error.message)


def _feedback_event(request: chat_pb2.FeedbackRequest, model_version: str) -> events_pb2.FeedbackEvent:
    event = events_pb2.FeedbackEvent(
        event_id=feedback_event_id(request.response_id, request.user_id),
        response_id=request.response_id,
        rating=request.rating,
        user_id=request.user_id,
        timestamp_ms=now_ms(),
        model_version=model_version,
    )
    if request.HasField("comment"):
        event.comment = request.comment
    return event


def _usage(done: Finished) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)
