"""Generates the Python protobuf and gRPC stubs from protos/ into rlhf_online/proto/.

Run it with `python -m rlhf_online.codegen` (the Makefile's `protos` target does). The generated files are
git-ignored and never edited by hand. protoc writes absolute imports (`from rlhf.v1 import chat_pb2`) that
only work when `rlhf` is a top-level package, so they are rewritten to point into `rlhf_online.proto`.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "proto"


def generate() -> list[Path]:
    """Runs protoc on every .proto file and returns the generated Python files."""
    from grpc_tools import protoc  # codegen-only dependency

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    OUT_DIR.mkdir(exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see the messages above")
    generated = sorted(OUT_DIR.rglob("*_pb2*.py")) + sorted(OUT_DIR.rglob("*_pb2.pyi"))
    for path in generated:
        _rewrite_imports(path)
    for package in {OUT_DIR, *(p.parent for p in generated)}:
        while package != OUT_DIR.parent:
            (package / "__init__.py").touch()
            package = package.parent
    return generated


def _rewrite_imports(path: Path) -> None:
    """Points `from rlhf.v1 import x_pb2` at `rlhf_online.proto.rlhf.v1`."""
    text = path.read_text()
    text = re.sub(r"^from rlhf\.", "from rlhf_online.proto.rlhf.", text, flags=re.M)
    path.write_text(text)


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT))
