"""The outbox's journal on disk: an answer's Interaction outlives a SIGKILL of the process that served it.

Without it, an Interaction waits for the broker in memory only: a replica killed (OOM, SIGKILL, a failed
liveness probe) before the broker acknowledged it loses it, and a rating of that answer accepted by another
replica, or by the next incarnation, can never be joined (tests/faults, scenario 1). With `--outbox-dir`,
every record is appended to a segment file before the answer leaves the process (one `write()`: the bytes are
in the kernel's page cache, which a killed process cannot take with it), and every broker acknowledgement
appends an ack entry. The next process started on the same directory (in Kubernetes: the restarted container
on the pod's volume) sends what the last one left unacknowledged.

Guarantees and limits:
- A SIGKILL loses nothing. A machine crash may lose the last records unless `fsync` is on (one fsync per
  record; off by default).
- Records are sent again at least once: one acknowledged just before the kill, with its ack entry not yet
  written, is sent twice. Downstream joins by response id, so a copy changes nothing (docs/design.md).
- One process per directory (an exclusive lock): two replicas must not share one.

Layout: `segment-00000001.log`, ... Each entry: header `>IIQB` (payload length, CRC-32 of seq, kind and
payload, seq, kind), then the payload (kind 1, a record: topic length `>H`, topic, key length `>I`, key,
value; kind 2, the ack of record `seq`: empty). A segment is deleted when it and every older one hold no
unacknowledged record, so an ack entry is never deleted before the record it acknowledges.
"""

import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IIQB")  # payload length, crc32, seq, kind
_RECORD, _ACK = 1, 2
_PREFIX, _SUFFIX = "segment-", ".log"


@dataclass(frozen=True)
class JournaledRecord:
    seq: int
    topic: str
    key: bytes
    value: bytes


class JournalError(RuntimeError):
    """The journal's directory cannot be used (locked by another process, not writable)."""


class Journal:
    """Append-only segments of records and acks; not thread-safe (the outbox calls it under its lock)."""

    def __init__(self, directory: str | Path, *, segment_bytes: int = 8 << 20, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.segment_bytes, self.fsync = segment_bytes, fsync
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.directory / "LOCK", "a")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise JournalError(
                f"outbox journal {self.directory} is in use by another process; give every replica its own "
                "--outbox-dir"
            ) from e
        except OSError as e:
            raise JournalError(f"cannot use outbox journal {self.directory}: {e}") from e
        self._segment_of: dict[int, int] = {}  # seq of an unacknowledged record -> its segment number
        self._unacked: dict[int, int] = {}  # segment number -> its unacknowledged records
        self._next_seq = 1
        self._fd = -1
        self._active = 0
        self._size = 0

    def replay(self) -> list[JournaledRecord]:
        """What earlier processes left unacknowledged, oldest first; then opens a new segment. Call once."""
        pending: dict[int, JournaledRecord] = {}
        for number, path in self._segments():
            self._unacked.setdefault(number, 0)
            for seq, kind, payload in _read_entries(path):
                self._next_seq = max(self._next_seq, seq + 1)
                if kind == _RECORD:
                    pending[seq] = _decode_record(seq, payload)
                    self._segment_of[seq] = number
                    self._unacked[number] += 1
                elif seq in pending:
                    del pending[seq]
                    self._unacked[self._segment_of.pop(seq)] -= 1
        last = max(self._unacked, default=0)
        self._open(last + 1)
        self._collect()
        if pending:
            log.warning(
                "outbox journal %s: sending %d records an earlier process left", self.directory, len(pending)
            )
        return [pending[seq] for seq in sorted(pending)]

    def append(self, topic: str, key: bytes, value: bytes) -> int:
        """Writes a record; returns its seq (pass it to `ack`)."""
        seq = self._next_seq
        self._next_seq += 1
        t = topic.encode()
        self._write(seq, _RECORD, struct.pack(">H", len(t)) + t + struct.pack(">I", len(key)) + key + value)
        self._segment_of[seq] = self._active
        self._unacked[self._active] += 1
        if self._size >= self.segment_bytes:
            self._open(self._active + 1)
        return seq

    def ack(self, seq: int) -> None:
        """Records that the broker acknowledged record `seq` (or that it was given up on)."""
        segment = self._segment_of.pop(seq, None)
        if segment is None or self._fd < 0:  # closed: the record is sent again by the next start
            return
        self._write(seq, _ACK, b"")
        self._unacked[segment] -= 1
        self._collect()

    @property
    def unacknowledged(self) -> int:
        return len(self._segment_of)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._lock.close()

    def _write(self, seq: int, kind: int, payload: bytes) -> None:
        crc = zlib.crc32(struct.pack(">QB", seq, kind) + payload)
        entry = _HEADER.pack(len(payload), crc, seq, kind) + payload
        os.write(self._fd, entry)  # O_APPEND: one write() per entry, whole in the page cache
        if self.fsync:
            os.fsync(self._fd)
        self._size += len(entry)

    def _open(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / f"{_PREFIX}{number:08d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active, self._size = number, os.fstat(self._fd).st_size
        self._unacked.setdefault(number, 0)

    def _collect(self) -> None:
        """Deletes the oldest segments while they hold nothing unacknowledged (never the active one)."""
        for number in sorted(self._unacked):
            if number == self._active or self._unacked[number] > 0:
                return
            del self._unacked[number]
            (self.directory / f"{_PREFIX}{number:08d}{_SUFFIX}").unlink(missing_ok=True)

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob(f"{_PREFIX}*{_SUFFIX}"):
            digits = path.name[len(_PREFIX) : -len(_SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), path))
        return sorted(found)


def _read_entries(path: Path):
    """(seq, kind, payload) of each intact entry; stops at a torn or corrupt tail (a crash mid-write)."""
    data = path.read_bytes()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc, seq, kind = _HEADER.unpack_from(data, offset)
        payload = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if len(payload) < length or zlib.crc32(struct.pack(">QB", seq, kind) + payload) != crc:
            log.warning("outbox journal %s: ignoring a torn or corrupt entry at byte %d", path, offset)
            return
        yield seq, kind, payload
        offset += _HEADER.size + length


def _decode_record(seq: int, payload: bytes) -> JournaledRecord:
    (topic_len,) = struct.unpack_from(">H", payload, 0)
    topic = payload[2 : 2 + topic_len].decode()
    (key_len,) = struct.unpack_from(">I", payload, 2 + topic_len)
    start = 6 + topic_len
    return JournaledRecord(seq, topic, payload[start : start + key_len], payload[start + key_len :])
