"""Model registry: versioned folders of model files with a checksummed manifest (docs/design.md).

Layout: `{root}/{kind}/v000001/` holds the model files and `manifest.json`; `{root}/{kind}/LATEST` holds the
name of the current version. A version is written into a temporary folder beside its target, every file is
hashed and fsynced, then the folder is renamed into place in one step, so a version is either complete or not
there at all (promise 4). Readers call `verify` before loading:

    registry = Registry(".rlhf/registry")
    model = AutoModelForCausalLM.from_pretrained(registry.verify("policy", registry.latest("policy")))
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf_online.contract import check_kind, now_ms

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
_VERSION_RE = re.compile(r"^v(\d{6})$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base class of registry errors."""


class VersionNotFound(RegistryError):
    """An unknown version, or an empty registry; the message lists what exists."""


class CorruptVersion(RegistryError):
    """A version whose files do not match its manifest (missing, changed, unexpected), or a bad manifest."""


@dataclass(frozen=True)
class Manifest:
    """What a version holds: checksums of its files, where it came from, and figures about it."""

    kind: str  # "policy" | "reward"
    version: str  # "v000003"
    parent_version: str | None
    created_at_ms: int
    files: dict[str, str]  # relative posix path -> sha256 hex, every file except manifest.json
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form JSON (kafka offsets, gate figures, ...)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        return cls(
            kind=str(data["kind"]),
            version=str(data["version"]),
            parent_version=data.get("parent_version"),
            created_at_ms=int(data["created_at_ms"]),
            files={str(k): str(v) for k, v in data["files"].items()},
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
            extra=dict(data.get("extra") or {}),
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def version_name(number: int) -> str:
    """3 -> "v000003"."""
    return f"v{number:06d}"


class Registry:
    """A registry rooted at a local folder (or a ReadWriteMany volume); one writer per kind at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- writing -------------------------------------------------------------------------------------------

    def publish(
        self,
        kind: str,
        write: Callable[[Path], None],
        *,
        parent_version: str | None = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        set_latest: bool = True,
    ) -> Manifest:
        """Publishes the files that `write(tmp_dir)` writes as the next version of `kind`.

        1. `write` fills a temporary folder beside the target; 2. every file is hashed into manifest.json;
        3. files and folders are fsynced; 4. the folder is renamed into place as the next vNNNNNN;
        5. if `set_latest`, LATEST is replaced atomically. If anything fails, nothing becomes visible.
        """
        kind_dir = self._kind_dir(kind)
        kind_dir.mkdir(parents=True, exist_ok=True)
        extra_json = json.loads(json.dumps(dict(extra or {})))  # fail early on non-JSON values, and copy
        with self._lock(kind_dir):
            self._remove_stale_temps(kind_dir)
            tmp = kind_dir / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                write(tmp)
                if (tmp / MANIFEST).exists():
                    raise RegistryError(f"write() must not create {MANIFEST}; the registry writes it")
                files = {rel: sha256_file(tmp / rel) for rel in _list_files(tmp)}
                if not files:
                    raise RegistryError("write() wrote no files; a version must hold at least one file")
                version = version_name(self._last_number(kind_dir) + 1)
                manifest = Manifest(
                    kind=kind,
                    version=version,
                    parent_version=parent_version,
                    created_at_ms=now_ms(),
                    files=files,
                    metrics={str(k): float(v) for k, v in (metrics or {}).items()},
                    extra=extra_json,
                )
                (tmp / MANIFEST).write_text(manifest.to_json())
                _fsync_tree(tmp)
                os.rename(tmp, kind_dir / version)  # atomic: the version appears complete or not at all
                _fsync_dir(kind_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if set_latest:
                self._write_latest(kind_dir, version)
        log.info("published %s/%s (%d files, parent %s)", kind, version, len(files), parent_version)
        return manifest

    def publish_model(
        self,
        kind: str,
        model,
        tokenizer=None,
        *,
        extra_files: Mapping[str, bytes] | None = None,
        **publish_kwargs,
    ) -> Manifest:
        """Publishes a Hugging Face model (safetensors) plus its tokenizer and any extra files."""

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for rel, data in (extra_files or {}).items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

        return self.publish(kind, write, **publish_kwargs)

    def set_latest(self, kind: str, version: str) -> None:
        """Points LATEST at `version` after verifying it (used by Rollback)."""
        self.verify(kind, version)
        kind_dir = self._kind_dir(kind)
        with self._lock(kind_dir):
            self._write_latest(kind_dir, version)
        log.info("LATEST of %s is now %s", kind, version)

    def retain(self, kind: str, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Deletes versions older than the newest `keep`, never LATEST, its parent nor those in `protect`
        (the trainer's reference policy); returns the deleted."""
        if keep < 1:
            raise ValueError(f"keep={keep} would delete every version; keep at least 1")
        kind_dir = self._kind_dir(kind)
        if not kind_dir.exists():
            return []
        deleted = []
        with self._lock(kind_dir):
            protected = set(protect)
            latest = self.latest(kind)
            if latest is not None:
                protected.add(latest)
                with contextlib.suppress(RegistryError):
                    parent = self.manifest(kind, latest).parent_version
                    if parent:
                        protected.add(parent)
            versions = self.versions(kind)
            for version in versions[: max(0, len(versions) - keep)]:
                if version in protected:
                    continue
                # Rename first so a half-deleted folder is never mistaken for a version.
                doomed = kind_dir / f"{_TMP_PREFIX}deleted-{version}-{uuid.uuid4().hex[:8]}"
                os.rename(kind_dir / version, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                deleted.append(version)
            if deleted:
                _fsync_dir(kind_dir)
        if deleted:
            log.info("retention removed %s/%s", kind, ",".join(deleted))
        return deleted

    # ---- reading -------------------------------------------------------------------------------------------

    def versions(self, kind: str) -> list[str]:
        """Complete versions of `kind`, oldest first."""
        kind_dir = self._kind_dir(kind)
        if not kind_dir.is_dir():
            return []
        found = [p.name for p in kind_dir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found)

    def latest(self, kind: str) -> str | None:
        """The version LATEST points at, or None if nothing was published."""
        try:
            text = (self._kind_dir(kind) / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def path(self, kind: str, version: str) -> Path:
        """Folder of a version (not checked; call `verify` before loading from it)."""
        if not _VERSION_RE.match(version):
            raise VersionNotFound(f"{version!r} is not a version name; expected e.g. 'v000001'")
        return self._kind_dir(kind) / version

    def manifest(self, kind: str, version: str) -> Manifest:
        """The manifest of a version; raises VersionNotFound or CorruptVersion."""
        folder = self.path(kind, version)
        if not folder.is_dir():
            existing = ", ".join(self.versions(kind)) or "none"
            raise VersionNotFound(f"{kind} version {version} not found in {self.root} (existing: {existing})")
        try:
            manifest = Manifest.from_json((folder / MANIFEST).read_text())
        except FileNotFoundError as e:
            raise CorruptVersion(f"{folder / MANIFEST} is missing; the version is incomplete") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptVersion(f"{folder / MANIFEST} is unreadable ({e}); the version is corrupt") from e
        if manifest.kind != kind or manifest.version != version:
            raise CorruptVersion(
                f"{folder / MANIFEST} describes {manifest.kind}/{manifest.version}, not {kind}/{version}"
            )
        return manifest

    def verify(self, kind: str, version: str) -> Path:
        """Checks every file of a version against its sha256; returns the folder, ready to load from."""
        manifest = self.manifest(kind, version)
        folder = self.path(kind, version)
        on_disk = set(_list_files(folder)) - {MANIFEST}
        for rel, expected in sorted(manifest.files.items()):
            if rel not in on_disk:
                raise CorruptVersion(f"{kind}/{version}: file {rel} listed in the manifest is missing")
            actual = sha256_file(folder / rel)
            if actual != expected:
                raise CorruptVersion(
                    f"{kind}/{version}: file {rel} has sha256 {actual[:12]}..., the manifest says "
                    f"{expected[:12]}...; the version is corrupt, do not load it (roll back or republish)"
                )
        unexpected = sorted(on_disk - set(manifest.files))
        if unexpected:
            raise CorruptVersion(f"{kind}/{version}: files not in the manifest: {', '.join(unexpected)}")
        return folder

    # ---- internals -----------------------------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> Path:
        check_kind(kind)
        return self.root / kind

    def _last_number(self, kind_dir: Path) -> int:
        # Counts every version-named folder, complete or not, so a number is never reused.
        numbers = [int(m.group(1)) for p in kind_dir.iterdir() if (m := _VERSION_RE.match(p.name))]
        return max(numbers, default=0)

    def _write_latest(self, kind_dir: Path, version: str) -> None:
        tmp = kind_dir / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, kind_dir / LATEST)
        _fsync_dir(kind_dir)

    def _remove_stale_temps(self, kind_dir: Path) -> None:
        # Called under the lock: no other writer is active, so every temp entry was left by a crash.
        for p in kind_dir.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self, kind_dir: Path) -> Iterator[None]:
        kind_dir.mkdir(parents=True, exist_ok=True)
        with open(kind_dir / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _list_files(folder: Path) -> list[str]:
    """Relative posix paths of every regular file under `folder`, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(d)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
