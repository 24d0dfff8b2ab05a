"""The engine as it was before continuous batching, kept only as the baseline of benchmarks/engine_load.py.

Static batching: the worker takes up to `max_batch_size` waiting requests, runs them to the end as one batch
(rows that finish leave it, but nobody joins it), and only then looks at the queue again; a swap takes effect
between batches. Queue, streams, sampling and stops are the continuous engine's, so the benchmark compares
the scheduling alone. Not used by the service.
"""

import logging
import time

import torch

from rlhf_online.engine.engine import (
    BATCH_SIZE,
    GENERATED_TOKENS,
    QUEUE_DEPTH,
    EngineStopped,
    PolicyEngine,
    _Request,
    _Row,
    _stop_ids,
)
from rlhf_online.engine.sampling import choose_tokens, left_pad, position_ids

log = logging.getLogger(__name__)


class StaticPolicyEngine(PolicyEngine):
    """A `PolicyEngine` that batches statically (the engine of commit 3b7c514)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._pending: tuple[object, str] | None = None  # a swap waiting for the running batch to end
        self._busy = False  # a batch is running
        self.batches_run = 0

    def swap(self, model, version: str) -> None:
        """Serves `model` as `version` from the next batch on; the running batch finishes on the old model."""
        model = self._prepare(model)
        with self._cond:
            if self._busy:
                self._pending = (model, version)
            else:
                self._install(model, version)
            self._cond.notify_all()

    @torch.inference_mode()
    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            model, version, requests = batch
            try:
                self._generate(model, version, requests)
            finally:
                with self._cond:
                    self._busy = False
                    if self._pending is not None:
                        self._install(*self._pending)
                        self._pending = None
                    self._cond.notify_all()

    def _take_batch(self) -> tuple[object, str, list[_Request]] | None:
        """Waits for requests; takes up to max_batch_size of them with the model that will serve them."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._stopping)
            if self._stopping:
                return None
            n = min(self.max_batch_size, len(self._queue))
            requests = [self._queue.popleft() for _ in range(n)]
            QUEUE_DEPTH.set(len(self._queue))
            self._busy = True
            return self._model, self._version, requests

    def _generate(self, model, version: str, requests: list[_Request]) -> None:
        self.batches_run += 1
        self.largest_batch_seen = max(self.largest_batch_seen, len(requests))
        BATCH_SIZE.observe(len(requests))
        rows = [_Row(r, self.tokenizer, self.device) for r in requests]
        try:
            self._decode_batch(model, version, rows)
        except Exception as e:
            log.exception("generation failed for a batch of %d requests on %s", len(rows), version)
            for row in rows:
                row.stream._fail(RuntimeError(f"generation failed on the server: {e}"))

    def _decode_batch(self, model, version: str, rows: list[_Row]) -> None:
        """Prefill, then one token per step for the unfinished rows until none is left."""
        stop_ids = _stop_ids(model, self.tokenizer)
        input_ids, mask = left_pad([row.request.prompt_ids for row in rows], self.pad_id)  # (B, T)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = position_ids(mask)  # (B, T)
        temperature = torch.tensor([row.params.temperature for row in rows], device=self.device)  # (B,)
        top_p = torch.tensor([row.params.top_p for row in rows], device=self.device)  # (B,)
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        step = 0
        while True:
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            tokens = choose_tokens(logits, temperature, top_p, [row.generator for row in rows])  # (B,)
            GENERATED_TOKENS.inc(len(rows))
            alive = [
                i
                for i, (row, t) in enumerate(zip(rows, tokens.tolist(), strict=True))
                if row.advance(t, stop_ids, version)
            ]
            if self.step_hook is not None:
                self.step_hook(step)
            alive = [i for i in alive if not rows[i].stream.cancelled]
            if not alive:
                return
            if time.monotonic() > self._stop_deadline:
                for i in alive:
                    rows[i].stream._fail(EngineStopped("the engine stopped before the answer was done"))
                return
            if len(alive) < len(rows):  # finished rows leave the batch and its KV cache
                keep = torch.tensor(alive, device=self.device)
                cache.batch_select_indices(keep)
                mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
                temperature, top_p = temperature[keep], top_p[keep]
                rows = [rows[i] for i in alive]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (B, T + step + 1)
            positions = positions[:, -1:] + 1  # (B, 1)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            step += 1
