"""Reward checkpoints: a registry version that holds the model and everything needed to resume its lineage.

A `reward/vNNNNNN/` folder holds, besides the model files and `reward_config.json`:
- `applied_events.jsonl`: every event_id applied in this lineage, in order, with its split (train/heldout),
  so a replay never applies one twice (promise 2). One line per rating ever applied: at ~50 bytes a line, ten
  million ratings make 500 MB per checkpoint; beyond that, keep a compact set (a Bloom filter with the Kafka
  offsets as the exact bound) instead of the full list.
- `replay.jsonl` and `heldout.jsonl`: the replay reservoir and the held-out window;
- `optimizer.pt`: the AdamW state of the trainable parameters; `learner_state.json`: counters and rng state.
The manifest's `extra` records the Kafka offsets the checkpoint includes ("topic:partition" -> next offset).

`restore_or_init(registry, config)` is where the reward service starts: the newest reward version that
verifies, or a new reward model from the base model when there is none.
"""

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rlhf_online.contract import POLICY, REWARD, RewardFigure
from rlhf_online.registry import Manifest, Registry, RegistryError
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.learner import LearnerSettings, LearnerState, OnlineLearner
from rlhf_online.reward.model import RewardModel, init_reward_model, load_reward_model
from rlhf_online.reward.records import LabelledExample

log = logging.getLogger(__name__)

APPLIED = "applied_events.jsonl"
REPLAY = "replay.jsonl"
HELDOUT = "heldout.jsonl"
OPTIMIZER = "optimizer.pt"
STATE = "learner_state.json"
_HELDOUT_FIGURES = {  # RewardFigure name -> key of `OnlineLearner.evaluate()`
    RewardFigure.HELDOUT_ACCURACY: "accuracy",
    RewardFigure.HELDOUT_AUC: "auc",
    RewardFigure.HELDOUT_LOG_LOSS: "log_loss",
    RewardFigure.HELDOUT_N: "n",
}


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


@dataclass
class Lineage:
    """Where the reward service starts: its learner, the version it resumes (None: a new lineage) and the
    offsets that version includes ("topic:partition" -> next offset)."""

    learner: OnlineLearner
    version: str | None
    offsets: dict[str, int]


def restore_or_init(registry: Registry, config: RewardConfig) -> Lineage:
    """The newest reward version that verifies (a broken one is logged and the one before it tried), else a
    new reward model from the base model: `config.base_model_dir`, else the registry's oldest policy (the
    lineage's base), else the tiny preset."""
    settings = LearnerSettings(**{f.name: getattr(config, f.name) for f in fields(LearnerSettings)})
    latest = registry.latest(REWARD)
    for version in (v for v in reversed(registry.versions(REWARD)) if latest and v <= latest):
        try:
            restored = restore(registry, version, device=config.torch_device())
        except RegistryError as e:  # CorruptVersion included
            log.error("reward %s cannot be loaded (%s); trying the version before it", version, e)
            continue
        restored.model.max_length = config.max_length
        learner = OnlineLearner(restored.model, settings, restored.state)
        load_optimizer_state(learner, restored.optimizer_state)
        log.info(
            "resumed reward %s: %d ratings applied, %d updates, offsets %s",
            version,
            len(learner.applied),
            learner.updates,
            restored.offsets,
        )
        return Lineage(learner, version, restored.offsets)
    return Lineage(OnlineLearner(_new_model(registry, config), settings), None, {})


def _new_model(registry: Registry, config: RewardConfig) -> RewardModel:
    """A reward model initialised from the base model (see `restore_or_init`)."""
    if config.base_model_dir:
        return _init(config.base_model_dir, config)
    for version in registry.versions(POLICY):  # the oldest policy: the lineage's base model
        try:
            return _init(registry.verify(POLICY, version), config)
        except RegistryError as e:
            log.warning("policy %s cannot be used as the reward base (%s)", version, e)
    from rlhf_online.engine.tiny_model import write_tiny_model

    log.info("no --base-model-dir and no policy in the registry: starting from the tiny preset")
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-base-") as tmp:
        return _init(write_tiny_model(Path(tmp), seed=config.seed), config)


def _init(base: str | Path, config: RewardConfig) -> RewardModel:
    return init_reward_model(
        base,
        max_length=config.max_length,
        seed=config.seed,
        device=config.torch_device(),
        layers=config.backbone_layers,
        pooling=config.pooling,
    )


def figures(learner: OnlineLearner, heldout: Mapping[str, float]) -> dict[str, float]:
    """A checkpoint's metrics (its manifest's and its ModelEvent's), by `RewardFigure` names: the held-out
    figures of the model it holds (none before the first held-out example), and the lineage's totals, in every
    one (the trainer counts new ratings by RATINGS_APPLIED)."""
    return {
        **{name: float(heldout[key]) for name, key in _HELDOUT_FIGURES.items() if heldout},
        RewardFigure.RATINGS_APPLIED: float(len(learner.applied)),
        RewardFigure.UPDATES: float(learner.updates),
    }


def publish_checkpoint(
    registry: Registry,
    learner: OnlineLearner,
    *,
    parent_version: str | None,
    offsets: dict[str, int],
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Publishes the learner (model + state) as the next reward version.

    Raises:
        RuntimeError: if examples wait for an update (apply them first: a checkpoint includes every example
            admitted so far, and the caller's metrics must describe the model it publishes).
    """
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
    return registry.publish(REWARD, write, parent_version=parent_version, metrics=metrics or {}, extra=info)


def restore(registry: Registry, version: str, device: str = "cpu") -> Restored:
    """Verifies a reward version and reads the model and learner state from it."""
    folder = registry.verify(REWARD, version)
    manifest = registry.manifest(REWARD, version)
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
