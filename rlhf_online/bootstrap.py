"""Makes sure the registry has a first policy version: the base model that serving and training start from."""

import fcntl
import logging
import shutil
from pathlib import Path

from rlhf_online.contract import POLICY
from rlhf_online.registry import Registry

log = logging.getLogger(__name__)

_MODEL_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


def ensure_initial_policy(registry: Registry, base_model_dir: Path) -> str:
    """Publishes `base_model_dir` as the first policy version if the registry has none; returns LATEST.

    Inference replicas and the trainer all call this at start, so it takes a lock on the registry root:
    exactly one of them publishes, the others see its version.
    """
    root = Path(registry.root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".bootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        latest = registry.latest(POLICY)
        if latest is not None:
            return latest
        base = Path(base_model_dir)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"base model directory {base} has no config.json; create one with "
                f"`rlhf-online init-model --preset tiny {base}` or point --base-model-dir at a Hugging Face "
                "model directory"
            )
        manifest = registry.publish(
            POLICY, lambda tmp: copy_model_files(base, tmp), extra={"base_model_dir": str(base.resolve())}
        )
        log.info("published base model %s as policy %s", base, manifest.version)
        return manifest.version


def copy_model_files(src: Path, dst: Path) -> None:
    """Copies the files a Hugging Face model directory needs (weights, config, tokenizer)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in _MODEL_SUFFIXES:
            shutil.copy2(path, dst / path.name)
