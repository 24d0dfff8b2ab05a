"""Signing-key rotation for response ids: a key id inside each id, accepted keys, retirement after a grace.

Unit tests of `rlhf_online.inference.signing` with a fake clock; tests/test_signing_rotation.py checks the
same through a real server.
"""

import pytest

from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import create_server
from rlhf_online.inference.signing import (
    InvalidResponseId,
    ResponseSigner,
    RetiredResponseId,
    SigningKey,
    format_time,
    parse_signing_keys,
    signer_from_settings,
)

NEW, OLD, OLDER = "n" * 32, "o" * 32, "p" * 32
RETIRE_AT = 1_750_000_000.0  # 2025-06-15T15:06:40Z


class Clock:
    """Unix seconds the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rotated(clock: Clock) -> ResponseSigner:
    return ResponseSigner(
        [SigningKey("k2", NEW.encode()), SigningKey("k1", OLD.encode(), retire_at=RETIRE_AT)], clock=clock
    )


def test_the_first_key_signs_and_its_id_is_inside_the_response_id():
    signer = rotated(Clock(RETIRE_AT - 60))
    response_id = signer.issue("v000007")
    assert response_id.startswith("k2.")
    verified = signer.verify(response_id)
    assert (verified.key_id, verified.model_version) == ("k2", "v000007")


def test_previous_key_verifies_during_the_grace_period_and_is_refused_once_retired():
    clock = Clock(RETIRE_AT - 1)
    old_replica = ResponseSigner([SigningKey("k1", OLD.encode())])
    response_id = old_replica.issue("v000003")
    signer = rotated(clock)
    assert signer.verify(response_id).model_version == "v000003"
    clock.now = RETIRE_AT
    with pytest.raises(RetiredResponseId, match=r"signed with key 'k1', retired at 2025-06-15T15:06:40Z"):
        signer.verify(response_id)
    assert signer.verify(signer.issue("v000003")).key_id == "k2"  # the signing key never retires


def test_a_single_signing_key_is_key_k0_and_rotates_without_refusing_its_ids():
    before = signer_from_settings(OLD, "")
    response_id = before.issue("v000001")
    assert response_id.startswith("k0.")
    after = signer_from_settings("", f"k1:{NEW},k0:{OLD}@2999-01-01T00:00:00Z")
    assert after.verify(response_id).key_id == "k0"
    assert after.issue("v000001").startswith("k1.")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda rid: rid[:-1] + ("0" if rid[-1] != "0" else "1"),  # tag
        lambda rid: rid.replace(".v000003.", ".v000004."),  # model version
        lambda rid: rid[:3] + ("f" if rid[3] != "f" else "e") + rid[4:],  # nonce
        lambda rid: "k1" + rid[2:],  # claims the other accepted key
    ],
)
def test_a_tampered_id_is_refused(tamper):
    signer = rotated(Clock(RETIRE_AT - 60))
    with pytest.raises(InvalidResponseId, match="signature check failed") as info:
        signer.verify(tamper(signer.issue("v000003")))
    assert not isinstance(info.value, RetiredResponseId)


def test_an_id_of_a_key_no_longer_listed_is_not_ours():
    response_id = ResponseSigner([SigningKey("k0", OLDER.encode())]).issue("v000001")
    with pytest.raises(InvalidResponseId, match="unknown signing key id 'k0'"):
        rotated(Clock(0)).verify(response_id)


def test_signing_keys_parse_with_iso_and_unix_retire_times():
    keys = parse_signing_keys(f" k2:{NEW} , k1:{OLD}@2025-06-15T15:06:40Z,k0:{OLDER}@1750000000 ")
    assert [k.key_id for k in keys] == ["k2", "k1", "k0"]
    assert [k.retire_at for k in keys] == [None, RETIRE_AT, RETIRE_AT]
    assert keys[0].secret == NEW.encode()
    assert format_time(RETIRE_AT) == "2025-06-15T15:06:40Z"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "signing_keys is empty"),
        (f"k1:{NEW}@2030-01-01T00:00:00Z", "the first key ('k1') signs new ids and cannot retire"),
        (f"k1:{NEW},k1:{OLD}@1", "appear more than once"),
        ("k1:short", "at least 16 bytes"),
        (f"bad.id:{NEW}", "is not valid; use 1-16 letters"),
        (f"k1:{NEW},k0:{OLD}@soon", "not ISO 8601"),
        (f"k1:{NEW},k0:{OLD}@2030-01-01T00:00:00", "has no zone"),
    ],
)
def test_bad_signing_keys_say_what_to_fix(spec, fragment):
    with pytest.raises(ValueError) as info:
        parse_signing_keys(spec)
    assert fragment in str(info.value)


def test_a_malformed_entry_does_not_echo_its_secret():
    with pytest.raises(ValueError) as info:
        parse_signing_keys(f"k1:{NEW},{OLD}")
    assert "entry 2" in str(info.value) and OLD not in str(info.value)


def test_settings_refuse_both_forms_at_once():
    with pytest.raises(ValueError, match="not both"):
        signer_from_settings(OLD, f"k1:{NEW}")
    assert signer_from_settings("", "") is None


async def test_the_server_refuses_bad_keys_before_loading_anything(tmp_path):
    config = InferenceConfig(registry_dir=str(tmp_path), signing_keys="k1:tiny")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        await create_server(config)
