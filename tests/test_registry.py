"""Model registry: atomic publish, LATEST, verification of every checksum, retention (promise 4)."""

import json
import os
from pathlib import Path

import pytest

from rlhf_online.registry import (
    MANIFEST,
    CorruptVersion,
    Manifest,
    Registry,
    RegistryError,
    VersionNotFound,
)


def writer(files: dict[str, bytes]):
    def write(tmp: Path) -> None:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    return write


def test_publish_list_latest_and_manifest(tmp_path):
    reg = Registry(tmp_path)
    assert reg.versions("reward") == []
    assert reg.latest("reward") is None

    m1 = reg.publish("reward", writer({"a.bin": b"one", "sub/b.txt": b"two"}), metrics={"auc": 0.5})
    m2 = reg.publish(
        "reward", writer({"a.bin": b"three"}), parent_version=m1.version, extra={"offsets": {"0": 7}}
    )

    assert (m1.version, m2.version) == ("v000001", "v000002")
    assert reg.versions("reward") == ["v000001", "v000002"]
    assert reg.latest("reward") == "v000002"
    assert reg.versions("policy") == []
    assert set(m1.files) == {"a.bin", "sub/b.txt"}
    loaded = reg.manifest("reward", "v000002")
    assert loaded == m2
    assert loaded.parent_version == "v000001"
    assert loaded.extra == {"offsets": {"0": 7}}
    assert reg.manifest("reward", "v000001").metrics == {"auc": 0.5}
    assert (reg.verify("reward", "v000001") / "sub" / "b.txt").read_bytes() == b"two"
    assert Manifest.from_json(m1.to_json()) == m1


def test_set_latest_false_and_rollback(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("policy", writer({"w": b"1"}))
    reg.publish("policy", writer({"w": b"2"}), set_latest=False)
    assert reg.latest("policy") == "v000001"
    reg.set_latest("policy", "v000002")
    assert reg.latest("policy") == "v000002"
    reg.set_latest("policy", "v000001")
    assert reg.latest("policy") == "v000001"
    with pytest.raises(VersionNotFound, match="v000001, v000002"):
        reg.set_latest("policy", "v000009")


def test_one_flipped_byte_is_refused(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("reward", writer({"model.safetensors": bytes(range(256)) * 4, "config.json": b"{}"}))
    target = reg.path("reward", "v000001") / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(CorruptVersion, match=r"model\.safetensors.*sha256"):
        reg.verify("reward", "v000001")
    with pytest.raises(CorruptVersion):  # and it cannot become LATEST
        reg.set_latest("reward", "v000001")


@pytest.mark.parametrize("damage", ["missing_file", "extra_file", "bad_manifest", "no_manifest"])
def test_partial_or_damaged_versions_are_refused(tmp_path, damage):
    reg = Registry(tmp_path)
    reg.publish("reward", writer({"a": b"x", "b": b"y"}))
    folder = reg.path("reward", "v000001")
    if damage == "missing_file":
        (folder / "b").unlink()
    elif damage == "extra_file":
        (folder / "c").write_bytes(b"z")
    elif damage == "bad_manifest":
        (folder / MANIFEST).write_text("{not json")
    else:
        (folder / MANIFEST).unlink()
    with pytest.raises(CorruptVersion):
        reg.verify("reward", "v000001")


def test_failed_write_leaves_nothing_visible(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("reward", writer({"a": b"1"}))

    def crashing_write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reg.publish("reward", crashing_write)
    assert reg.versions("reward") == ["v000001"]
    assert reg.latest("reward") == "v000001"
    assert sorted(p.name for p in (tmp_path / "reward").iterdir()) == [".lock", "LATEST", "v000001"]


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("reward", writer({"a": b"1"}))
    # What a SIGKILL in the middle of publish leaves: a temp folder, and a temp LATEST.
    stale = tmp_path / "reward" / ".tmp-12345-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "reward" / ".tmp-LATEST-1-x").write_text("v000009")
    assert reg.versions("reward") == ["v000001"]
    assert reg.latest("reward") == "v000001"

    m = reg.publish("reward", writer({"a": b"2"}))
    assert m.version == "v000002"
    assert not stale.exists()


def test_unknown_version_lists_existing(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(VersionNotFound, match="none"):
        reg.verify("policy", "v000001")
    reg.publish("policy", writer({"a": b"1"}))
    with pytest.raises(VersionNotFound, match="existing: v000001"):
        reg.manifest("policy", "v000002")
    with pytest.raises(VersionNotFound, match="not a version name"):
        reg.path("policy", "../etc")
    with pytest.raises(ValueError, match="kind"):
        reg.versions("critic")
    assert issubclass(CorruptVersion, RegistryError) and issubclass(VersionNotFound, RegistryError)


def test_write_must_not_write_manifest_or_nothing(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="manifest"):
        reg.publish("reward", writer({MANIFEST: b"{}"}))
    with pytest.raises(RegistryError, match="no files"):
        reg.publish("reward", writer({}))
    with pytest.raises(TypeError):
        reg.publish("reward", writer({"a": b"1"}), extra={"x": object()})
    assert reg.versions("reward") == []


def test_retain_keeps_latest_and_its_parent(tmp_path):
    reg = Registry(tmp_path)
    parent = None
    for i in range(6):
        parent = reg.publish("policy", writer({"w": str(i).encode()}), parent_version=parent).version
    # Roll back to v000002 (parent v000001): both must survive retention of 2.
    reg.set_latest("policy", "v000002")
    deleted = reg.retain("policy", keep=2)
    assert deleted == ["v000003", "v000004"]
    assert reg.versions("policy") == ["v000001", "v000002", "v000005", "v000006"]
    for v in reg.versions("policy"):
        reg.verify("policy", v)
    # Numbers are never reused after retention.
    assert reg.publish("policy", writer({"w": b"7"})).version == "v000007"
    with pytest.raises(ValueError):
        reg.retain("policy", keep=0)


def test_retain_never_deletes_a_protected_version(tmp_path):
    reg = Registry(tmp_path)
    for i in range(5):
        reg.publish("policy", writer({"w": str(i).encode()}))
    # v000001 is the trainer's reference policy: it outlives retention of 1 (no version here has a parent).
    assert reg.retain("policy", keep=1, protect=["v000001"]) == ["v000002", "v000003", "v000004"]
    assert reg.versions("policy") == ["v000001", "v000005"]


def test_manifest_is_plain_json_with_every_file(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("reward", writer({"x/y.txt": b"hello"}), extra={"applied": 3})
    data = json.loads((reg.path("reward", "v000001") / MANIFEST).read_text())
    assert data["files"] == {"x/y.txt": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert data["kind"] == "reward" and data["version"] == "v000001" and data["extra"] == {"applied": 3}
    assert os.path.getsize(reg.path("reward", "v000001") / "x" / "y.txt") == 5


def test_publish_model_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    reg = Registry(tmp_path)
    m = reg.publish_model("policy", model, extra_files={"notes/readme.txt": b"hi"}, metrics={"kl": 0.01})
    assert "model.safetensors" in m.files and "config.json" in m.files and "notes/readme.txt" in m.files
    loaded = LlamaForCausalLM.from_pretrained(reg.verify("policy", m.version))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
