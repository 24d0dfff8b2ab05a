"""Online learning of the reward model from labelled examples as they arrive (pure: no Kafka here).

1. `add(example)`: a deterministic slice of events (by hash of event_id) goes to the held-out window and is
   never trained on; the rest waits for the next update. Every event_id is admitted at most once: the learner
   keeps the list of event_ids it applied (the checkpoint stores it), and refuses one it has seen.
2. `update()`: one mini-batch of the waiting examples plus as many replayed older ones (a reservoir sample of
   everything trained on, so old ratings are not forgotten), preferring replayed examples that form an up/down
   pair with a new one on the same prompt (Bradley-Terry). The new examples then join the replay reservoir.
   "Applied" means admitted as new data once; replaying an applied example later is rehearsal, not a new
   application.
3. `evaluate()`: accuracy, AUC and log-loss of the current model on the held-out window.
"""

import hashlib
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rlhf_online.reward import losses
from rlhf_online.reward.model import RewardModel, freeze_lower_layers
from rlhf_online.reward.records import LabelledExample

log = logging.getLogger(__name__)

TRAIN = "train"
HELDOUT = "heldout"


def is_heldout(event_id: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha256(event_id) as a fraction of 2^64, below `fraction`."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


@dataclass
class LearnerSettings:
    """The learning knobs of `RewardConfig`, as the learner needs them."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable_layers: int = 2
    replay_ratio: float = 1.0
    replay_capacity: int = 4096
    steps_per_update: int = 2
    micro_batch_size: int = 32
    pairwise_coef: float = 1.0
    class_weighting: bool = True
    heldout_fraction: float = 0.1
    heldout_window: int = 256
    seed: int = 0


@dataclass
class LearnerState:
    """Everything besides the weights that a checkpoint must carry to resume the same lineage."""

    applied: list[tuple[str, str]] = field(default_factory=list)  # (event_id, TRAIN|HELDOUT) in order
    replay: list[LabelledExample] = field(default_factory=list)  # reservoir of trained examples
    replay_seen: int = 0  # how many examples were offered to the reservoir
    heldout: list[LabelledExample] = field(default_factory=list)  # most recent held-out window
    n_up: int = 0  # trained thumbs up (class weights)
    n_down: int = 0
    updates: int = 0
    rng_state: object = None  # random.Random.getstate() of replay sampling


@dataclass
class UpdateResult:
    """Figures of one update."""

    examples: list[LabelledExample]  # the new examples it applied
    stats: dict[str, float]


class OnlineLearner:
    """Holds the reward model, its optimizer, the replay reservoir and the held-out window."""

    def __init__(
        self, model: RewardModel, settings: LearnerSettings, state: LearnerState | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        state = state or LearnerState()
        self.applied: list[tuple[str, str]] = list(state.applied)
        self._applied_ids = {eid for eid, _ in self.applied}
        self.replay: list[LabelledExample] = list(state.replay)
        self.replay_seen = state.replay_seen
        self.heldout: deque[LabelledExample] = deque(state.heldout, maxlen=settings.heldout_window)
        self.n_up, self.n_down = state.n_up, state.n_down
        self.updates = state.updates
        self.rng = random.Random(settings.seed)
        if state.rng_state is not None:
            self.rng.setstate(state.rng_state)
        self.pending: list[LabelledExample] = []
        self._pending_ids: set[str] = set()
        self._pending_since: float | None = None
        self.n_trainable = freeze_lower_layers(model, settings.trainable_layers)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        self.counts: Counter[str] = Counter()

    # ---- intake -------------------------------------------------------------------------------------------

    def seen(self, event_id: str) -> bool:
        """True if the event was applied (train or held-out) in this lineage, or is waiting for an update."""
        return event_id in self._applied_ids or event_id in self._pending_ids

    def add(self, example: LabelledExample, now: float | None = None) -> str | None:
        """Admits an example: returns HELDOUT or TRAIN, or None (counted) if its event_id was seen before."""
        if self.seen(example.event_id):
            self.counts["duplicate"] += 1
            return None
        if is_heldout(example.event_id, self.settings.heldout_fraction):
            self.heldout.append(example)
            self._mark_applied(example.event_id, HELDOUT)
            return HELDOUT
        if not self.pending:
            self._pending_since = time.monotonic() if now is None else now
        self.pending.append(example)
        self._pending_ids.add(example.event_id)
        return TRAIN

    def due(self, every_examples: int, interval_s: float, now: float | None = None) -> bool:
        """Whether an update is due: `every_examples` waiting, or the oldest has waited `interval_s`."""
        if not self.pending:
            return False
        now = time.monotonic() if now is None else now
        since = now if self._pending_since is None else self._pending_since
        return len(self.pending) >= every_examples or now - since >= interval_s

    # ---- learning -----------------------------------------------------------------------------------------

    def update(self, max_examples: int | None = None) -> UpdateResult | None:
        """One update on the oldest `max_examples` waiting examples (default all) plus replayed ones; None if
        nothing waits."""
        if not self.pending:
            return None
        n = len(self.pending) if max_examples is None else max_examples
        fresh, self.pending = self.pending[:n], self.pending[n:]
        self._pending_ids.difference_update(ex.event_id for ex in fresh)
        self._pending_since = None if not self.pending else self._pending_since
        batch = fresh + self._sample_replay(fresh)
        self.model.train()
        stats: dict[str, float] = {}
        for _ in range(self.settings.steps_per_update):
            stats = self._step(batch)
        for ex in fresh:
            self._mark_applied(ex.event_id, TRAIN)
            self._offer_to_replay(ex)
            if ex.label >= 0.5:
                self.n_up += 1
            else:
                self.n_down += 1
        if self.settings.class_weighting and self.n_up and self.n_down:
            self.model.prior_logit = math.log(self.n_up / self.n_down)
        self.updates += 1
        stats.update(fresh=float(len(fresh)), batch=float(len(batch)))
        return UpdateResult(fresh, stats)

    def _step(self, batch: list[LabelledExample]) -> dict[str, float]:
        """One optimizer step on `batch`, accumulated over micro-batches (sorted by prompt, so up/down pairs
        mostly share a micro-batch)."""
        s = self.settings
        w_up, w_down = 1.0, 1.0
        if s.class_weighting:  # from every rating trained on so far, this batch included
            up = sum(ex.label >= 0.5 for ex in batch)
            w_up, w_down = losses.class_weights(self.n_up + up, self.n_down + len(batch) - up)
        ordered = sorted(batch, key=lambda ex: ex.prompt)
        self.optimizer.zero_grad(set_to_none=True)
        totals: Counter[str] = Counter()
        for start in range(0, len(ordered), s.micro_batch_size):
            micro = ordered[start : start + s.micro_batch_size]
            prompts = [ex.prompt for ex in micro]
            labels_list = [ex.label for ex in micro]
            scores = self.model.logits(prompts, [ex.response for ex in micro])  # (b,)
            labels = torch.tensor(labels_list, dtype=scores.dtype, device=scores.device)  # (b,)
            pairs = losses.preference_pairs(prompts, labels_list)
            loss, parts = losses.reward_loss(scores, labels, pairs, w_up, w_down, s.pairwise_coef)
            (loss * len(micro) / len(ordered)).backward()
            for k, v in parts.items():
                totals[k] += v * (1.0 if k == "pairs" else len(micro) / len(ordered))
        if s.max_grad_norm > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
        self.optimizer.step()
        return dict(totals)

    def _sample_replay(self, fresh: list[LabelledExample]) -> list[LabelledExample]:
        """replay_ratio * len(fresh) examples from the reservoir: first the opposite-label partners of fresh
        examples on the same prompt, then uniform."""
        want = min(round(self.settings.replay_ratio * len(fresh)), len(self.replay))
        if want == 0:
            return []
        by_prompt: dict[tuple[str, bool], list[int]] = {}
        for i, ex in enumerate(self.replay):
            by_prompt.setdefault((ex.prompt, ex.label >= 0.5), []).append(i)
        chosen: list[int] = []
        taken: set[int] = set()
        for ex in fresh:
            partners = [i for i in by_prompt.get((ex.prompt, ex.label < 0.5), []) if i not in taken]
            if partners and len(chosen) < want:
                i = self.rng.choice(partners)
                chosen.append(i)
                taken.add(i)
        rest = [i for i in range(len(self.replay)) if i not in taken]
        chosen += self.rng.sample(rest, min(want - len(chosen), len(rest)))
        return [self.replay[i] for i in chosen]

    def _offer_to_replay(self, ex: LabelledExample) -> None:
        """Reservoir sampling (Vitter's algorithm R): every trained example stays with equal probability."""
        self.replay_seen += 1
        capacity = self.settings.replay_capacity
        if len(self.replay) < capacity:
            self.replay.append(ex)
        elif capacity > 0:
            j = self.rng.randrange(self.replay_seen)
            if j < capacity:
                self.replay[j] = ex

    def _mark_applied(self, event_id: str, split: str) -> None:
        self.applied.append((event_id, split))
        self._applied_ids.add(event_id)
        self.counts[split] += 1

    # ---- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, examples: Iterable[LabelledExample] | None = None) -> dict[str, float]:
        """Accuracy, AUC and log-loss on the held-out window (or `examples`); {} when there is nothing."""
        examples = list(self.heldout if examples is None else examples)
        if not examples:
            return {}
        scores = self.model.score([ex.prompt for ex in examples], [ex.response for ex in examples])  # (N,)
        labels = torch.tensor([ex.label for ex in examples], dtype=scores.dtype)  # (N,)
        return {
            "accuracy": losses.accuracy(scores, labels),
            "auc": losses.auc(scores, labels),
            "log_loss": losses.log_loss(scores, labels),
            "n": float(len(examples)),
        }

    # ---- state --------------------------------------------------------------------------------------------

    def state(self) -> LearnerState:
        """A snapshot for a checkpoint; waiting examples must be applied (update) first."""
        if self.pending:
            raise RuntimeError("update() before taking a checkpoint: examples are still waiting")
        return LearnerState(
            applied=list(self.applied),
            replay=list(self.replay),
            replay_seen=self.replay_seen,
            heldout=list(self.heldout),
            n_up=self.n_up,
            n_down=self.n_down,
            updates=self.updates,
            rng_state=self.rng.getstate(),
        )
