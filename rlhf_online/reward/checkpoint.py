"""Reward checkpoints: a registry version that holds the model and everything needed to resume its lineage.

A `reward/vNNNNNN/` folder holds, besides the model files and `reward_config.json`:
- `applied_events.jsonl`: every event_id applied in this lineage, in order, with its split (train/heldout),
  so a replay never applies one twice (promise 2). One line per rating ever applied: at ~50 bytes a line, ten
  million ratings make 500 MB per checkpoint; beyond that, keep a compact set (a Bloom filter with the Kafka
  offsets as the exact bound) instead of the full list.
- `replay.jsonl` and `heldout.jsonl`: the replay reservoir and the held-out window;
- `optimizer.pt`: the AdamW state of the trainable parameters; `learner_state.json`: counters and rng state.
The manifest's `extra` records the Kafka offsets the checkpoint includes ("topic:partition" -> next offset).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_online.registry import Manifest, Registry
from rlhf_online.reward.learner import LearnerState, OnlineLearner
from rlhf_online.reward.model import RewardModel, load_reward_model
from rlhf_online.reward.records import LabelledExample

log = logging.getLogger(__name__)

KIND = "reward"
APPLIED = "applied_events.jsonl"
REPLAY = "replay.jsonl"
HELDOUT = "heldout.jsonl"
OPTIMIZER = "optimizer.pt"
STATE = "learner_state.json"


@dataclass
class Restored:
    """A reward lineage read back from the registry."""

    model: RewardModel
    state: LearnerState
    optimizer_state: dict | None
    manifest: Manifest

    @property
    def offsets(self) -> dict[str, int]:
        return dict(self.manifest.extra.get("offsets", {}))


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def parse_offset_key(key: str) -> tuple[str, int]:
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)


def publish_checkpoint(
    registry: Registry,
    learner: OnlineLearner,
    *,
    parent_version: str | None,
    offsets: dict[str, int],
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Publishes the learner (model + state) as the next reward version, applying waiting examples first."""
    while learner.pending:  # a checkpoint includes every example admitted so far
        learner.update()
    state = learner.state()

    def write(tmp: Path) -> None:
        learner.model.save(tmp)
        _write_lines(tmp / APPLIED, (json.dumps(list(pair)) for pair in state.applied))
        _write_lines(tmp / REPLAY, (ex.to_json() for ex in state.replay))
        _write_lines(tmp / HELDOUT, (ex.to_json() for ex in state.heldout))
        torch.save(learner.optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(
            json.dumps(
                {
                    "replay_seen": state.replay_seen,
                    "n_up": state.n_up,
                    "n_down": state.n_down,
                    "updates": state.updates,
                    "rng_state": state.rng_state,
                }
            )
        )

    n_train = sum(1 for _, split in state.applied if split == "train")
    info = {
        "offsets": dict(offsets),
        "updates": state.updates,
        "applied_events": len(state.applied),
        "applied_train": n_train,
        "applied_heldout": len(state.applied) - n_train,
        **(extra or {}),
    }
    return registry.publish(KIND, write, parent_version=parent_version, metrics=metrics or {}, extra=info)


def restore(registry: Registry, version: str, device: str = "cpu") -> Restored:
    """Verifies a reward version and reads the model and learner state from it."""
    folder = registry.verify(KIND, version)
    manifest = registry.manifest(KIND, version)
    model = load_reward_model(folder, device=device)
    state = read_state(folder)
    optimizer_state = (
        torch.load(folder / OPTIMIZER, map_location=device) if (folder / OPTIMIZER).exists() else None
    )
    return Restored(model, state, optimizer_state, manifest)


def read_state(folder: Path) -> LearnerState:
    """The learner state stored in a checkpoint folder (empty parts where a file is absent)."""
    info = json.loads((folder / STATE).read_text()) if (folder / STATE).exists() else {}
    rng = info.get("rng_state")
    return LearnerState(
        applied=[(eid, split) for eid, split in (json.loads(line) for line in _read_lines(folder / APPLIED))],
        replay=[LabelledExample.from_json(line) for line in _read_lines(folder / REPLAY)],
        replay_seen=int(info.get("replay_seen", 0)),
        heldout=[LabelledExample.from_json(line) for line in _read_lines(folder / HELDOUT)],
        n_up=int(info.get("n_up", 0)),
        n_down=int(info.get("n_down", 0)),
        updates=int(info.get("updates", 0)),
        rng_state=(rng[0], tuple(rng[1]), rng[2]) if rng else None,
    )


def applied_event_ids(folder: Path) -> list[str]:
    """Every event_id a checkpoint says it applied, in order, duplicates kept (for audits and tests)."""
    return [json.loads(line)[0] for line in _read_lines(folder / APPLIED)]


def load_optimizer_state(learner: OnlineLearner, optimizer_state: dict | None) -> None:
    """Restores AdamW moments when the trainable parameters match; starts fresh (logged) when they do not."""
    if optimizer_state is None:
        return
    try:
        learner.optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        log.warning("optimizer state of the checkpoint does not fit (%s); starting AdamW afresh", e)


def _write_lines(path: Path, lines) -> None:
    with open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]
