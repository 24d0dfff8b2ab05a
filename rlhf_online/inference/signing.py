"""Signed response ids, so any replica can check that a rating refers to a response we served (promise 7).

A response id is `<key_id>.<nonce>.<model_version>.<tag>`: the id of the signing key, a random 128-bit nonce
in hex, the policy version that generated the response, and a truncated HMAC-SHA256 of the other three under
that key. No state is shared between replicas; forging an id needs a key.

Keys rotate without refusing ratings already in flight (docs/security.md). `signing_keys` lists them, the
signing key first, then previous keys that are still accepted until their retire time:

    signing_keys = "k2:<new secret>,k1:<old secret>@2025-07-01T00:00:00Z"

An id signed by a previous key verifies until that time, then is refused as retired; an id whose key is not
listed at all is refused as not ours. A single `signing_key` is the key "k0".
"""

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

_TAG_BYTES = 16
_KEY_ID = r"[A-Za-z0-9_\-]{1,16}"
_KEY_ID_PATTERN = re.compile(rf"^{_KEY_ID}$")
_ID_PATTERN = re.compile(
    rf"^(?P<kid>{_KEY_ID})\.(?P<nonce>[0-9a-f]{{32}})\.(?P<version>[A-Za-z0-9_\-]{{1,64}})"
    r"\.(?P<tag>[0-9a-f]{32})$"
)
MAX_RESPONSE_ID_CHARS = 16 + 1 + 32 + 1 + 64 + 1 + 32
MIN_SECRET_BYTES = 16
DEFAULT_KEY_ID = "k0"


class InvalidResponseId(ValueError):
    """The response id is garbled or was not signed with any key we accept."""


class RetiredResponseId(InvalidResponseId):
    """The response id is genuine, but its signing key was retired: ratings of it are no longer taken."""


@dataclass(frozen=True)
class SigningKey:
    """One HMAC key: its id (written into every id it signs), its secret, and when it stops verifying."""

    key_id: str
    secret: bytes
    retire_at: float | None = None  # unix seconds; None: never retires (the signing key)

    def __post_init__(self) -> None:
        if not _KEY_ID_PATTERN.match(self.key_id):
            raise ValueError(
                f"signing key id {self.key_id!r} is not valid; use 1-16 letters, digits, '_' or '-'"
            )
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"signing key {self.key_id!r} is {len(self.secret)} bytes; it must be at least "
                f"{MIN_SECRET_BYTES} bytes; generate one with `openssl rand -hex 32`"
            )


@dataclass(frozen=True)
class VerifiedResponse:
    """What a valid response id tells us."""

    response_id: str
    model_version: str
    key_id: str


def parse_signing_keys(spec: str) -> list[SigningKey]:
    """`"k2:secret2,k1:secret1@2025-07-01T00:00:00Z"` -> keys, signing key first; raises ValueError saying
    what to fix. A retire time is ISO 8601 with a zone, or unix seconds; the first key takes none."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    keys = [_parse_key(part, i) for i, part in enumerate(parts)]
    if not keys:
        raise ValueError("signing_keys is empty; give at least one 'key_id:secret'")
    if keys[0].retire_at is not None:
        raise ValueError(
            f"signing_keys: the first key ({keys[0].key_id!r}) signs new ids and cannot retire; "
            "put the new key first and give the retire time to the old one"
        )
    ids = [k.key_id for k in keys]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"signing_keys: key ids {duplicates} appear more than once; give each its own id")
    return keys


def _parse_key(part: str, index: int) -> SigningKey:
    key_id, sep, rest = part.partition(":")
    if not sep or not rest:  # the message shows no part of the entry: it may be a secret
        raise ValueError(
            f"signing_keys entry {index + 1} is not 'key_id:secret' or 'key_id:secret@retire_time'"
        )
    secret, at, when = rest.partition("@")
    return SigningKey(key_id.strip(), secret.encode(), _parse_time(when.strip(), key_id) if at else None)


def _parse_time(text: str, key_id: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(
            f"signing key {key_id!r}: retire time {text!r} is not ISO 8601 (2025-07-01T00:00:00Z) nor unix "
            "seconds"
        ) from e
    if moment.tzinfo is None:
        raise ValueError(f"signing key {key_id!r}: retire time {text!r} has no zone; add 'Z' for UTC")
    return moment.timestamp()


def format_time(unix_s: float) -> str:
    """Unix seconds as ISO 8601 UTC, as messages and logs show retire times."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


class ResponseSigner:
    """Issues response ids with the first key and verifies them with any key not yet retired."""

    def __init__(self, keys: bytes | Sequence[SigningKey], *, clock: Callable[[], float] = time.time) -> None:
        """`keys`: one secret (the key "k0"), or keys with the signing key first. `clock`: unix seconds."""
        keys = [SigningKey(DEFAULT_KEY_ID, keys)] if isinstance(keys, bytes) else list(keys)
        if not keys:
            raise ValueError("a ResponseSigner needs at least one signing key")
        self._signing = keys[0]
        self._keys = {k.key_id: k for k in keys}
        self._clock = clock

    @property
    def keys(self) -> list[SigningKey]:
        """The accepted keys, signing key first."""
        return list(self._keys.values())

    def issue(self, model_version: str) -> str:
        """A fresh signed id for a response generated by `model_version`."""
        kid, nonce = self._signing.key_id, secrets.token_hex(16)
        return f"{kid}.{nonce}.{model_version}.{_tag(self._signing.secret, kid, nonce, model_version)}"

    def verify(self, response_id: str) -> VerifiedResponse:
        """Returns the id's contents, or raises InvalidResponseId (RetiredResponseId) saying what is wrong."""
        if len(response_id) > MAX_RESPONSE_ID_CHARS:
            raise InvalidResponseId(
                f"response_id is {len(response_id)} characters, longer than any id we issue"
            )
        match = _ID_PATTERN.match(response_id)
        if match is None:
            raise InvalidResponseId(
                "response_id is malformed; pass the response_id returned by Chat or ChatStream"
            )
        kid, nonce, version, tag = match["kid"], match["nonce"], match["version"], match["tag"]
        key = self._keys.get(kid)
        if key is None:
            raise InvalidResponseId(
                f"response_id was not issued by this service (unknown signing key id {kid!r})"
            )
        if not hmac.compare_digest(tag, _tag(key.secret, kid, nonce, version)):
            raise InvalidResponseId("response_id was not issued by this service (signature check failed)")
        if key.retire_at is not None and self._clock() >= key.retire_at:
            raise RetiredResponseId(
                f"response_id was signed with key {kid!r}, retired at {format_time(key.retire_at)}; "
                "ratings of responses that old are no longer accepted"
            )
        return VerifiedResponse(response_id=response_id, model_version=version, key_id=kid)


def _tag(secret: bytes, kid: str, nonce: str, version: str) -> str:
    mac = hmac.new(secret, f"{kid}.{nonce}.{version}".encode(), hashlib.sha256)
    return mac.digest()[:_TAG_BYTES].hex()


def signer_from_settings(signing_key: str, signing_keys: str) -> ResponseSigner | None:
    """The signer the `signing_key` / `signing_keys` settings describe; None if both are empty."""
    if signing_key and signing_keys:
        raise ValueError(
            "set signing_keys or signing_key, not both; to rotate, move the old secret into signing_keys as "
            f"'{DEFAULT_KEY_ID}:<old secret>@<retire time>' after the new key"
        )
    if signing_keys:
        return ResponseSigner(parse_signing_keys(signing_keys))
    return ResponseSigner(signing_key.encode()) if signing_key else None


def random_signer() -> ResponseSigner:
    """A per-process key (id "local"): only this process accepts ratings of its responses."""
    return ResponseSigner([SigningKey("local", secrets.token_bytes(32))])


def feedback_event_id(response_id: str, user_id: str) -> str:
    """Deterministic per (response, user): a duplicate vote or a client retry yields the same event id, so the
    reward service's event_id deduplication also enforces one vote per user per response across replicas."""
    return hashlib.sha256(f"{response_id}\x00{user_id}".encode()).hexdigest()[:32]
