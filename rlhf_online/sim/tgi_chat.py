"""The simulated users' chat over TGI's HTTP protocol (`rlhf-online simulate --protocol tgi`).

A TGI client sends the prompt exactly as the model should see it, so the users render the chat with the
model's own template first (`--tokenizer-dir`; without one, the prompt goes as plain text). Answers come
from `POST /generate` (the response id in the `x-response-id` header) or `POST /generate_stream` (in the last
event's "response_id"): Hugging Face's `text-generation` client drops both, so the users speak the protocol
with aiohttp here, as any app that rates answers has to. Ratings still go through gRPC SubmitFeedback.
"""

import json

import aiohttp

from rlhf_online.engine.chat_format import render_prompt

USER_HEADER = "x-user-id"


class TgiError(RuntimeError):
    """A TGI error answer: {"error", "error_type"} and its HTTP status."""


class TgiChat:
    """One aiohttp session against a TGI front end; `answer()` returns what a ChatResponse would carry."""

    def __init__(self, base_url: str, tokenizer_dir: str = "", timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self.session.close()

    def inputs(self, prompt: str) -> str:
        """The text TGI gets: the user's prompt in the model's chat template when a tokenizer is known."""
        return render_prompt(self.tokenizer, [("user", prompt)]) if self.tokenizer is not None else prompt

    async def answer(self, prompt: str, user_id: str, params: dict, stream: bool) -> dict:
        """{"text", "response_id", "model_version", "finish_reason", "completion_tokens"} of one answer.

        Raises:
            TgiError: the server answered with TGI's error format (or a stream ended without its last event).
        """
        body = {"inputs": self.inputs(prompt), "parameters": {**params, "details": True}}
        route = "/generate_stream" if stream else "/generate"
        async with self.session.post(self.base_url + route, json=body, headers={USER_HEADER: user_id}) as r:
            if r.status != 200:
                raise TgiError(f"HTTP {r.status}: {await r.text()}")
            return await (self._streamed(r) if stream else self._whole(r))

    async def _whole(self, response: aiohttp.ClientResponse) -> dict:
        body = await response.json()
        details = body.get("details") or {}
        return {
            "text": body["generated_text"],
            "response_id": response.headers.get("x-response-id", ""),
            "model_version": response.headers.get("x-model-version", ""),
            "finish_reason": _finish_reason(details.get("finish_reason")),
            "completion_tokens": int(details.get("generated_tokens", 0)),
        }

    async def _streamed(self, response: aiohttp.ClientResponse) -> dict:
        last = None
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:") :])
            if "error" in event:
                raise TgiError(f"{event.get('error_type')}: {event['error']}")
            if event.get("generated_text") is not None:
                last = event
        if last is None:
            raise TgiError("incomplete_generation: the stream ended without its last event")
        details = last.get("details") or {}
        return {
            "text": last["generated_text"],
            "response_id": last.get("response_id", ""),
            "model_version": last.get("model_version", ""),
            "finish_reason": _finish_reason(details.get("finish_reason")),
            "completion_tokens": int(details.get("generated_tokens", 0)),
        }


def _finish_reason(tgi: str | None) -> str:
    """TGI's finish reason -> ChatResponse's ("stop" or "length")."""
    return "length" if tgi == "length" else "stop"
