"""Generate the gRPC stubs: the one script (design habit 11).

    python -m wire.gen_protos [--out DIR]

Policy: the generated ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*.pyi`` are committed
under ``wire/pb/``; ``tests/wire/test_protos.py`` regenerates into a temporary
folder and diffs, so drift fails CI. protoc writes absolute imports derived from
the proto path (``from slai.v1 import common_pb2``); this script rewrites them to
``wire.pb.slai.v1`` so no ``sys.path`` tricks are needed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = ROOT / "wire" / "pb"
PACKAGE_PREFIX = "wire.pb"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    out.mkdir(parents=True, exist_ok=True)
    rel = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", *rel]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        fixed = re.sub(r"^from slai\.v1 import", f"from {PACKAGE_PREFIX}.slai.v1 import", text, flags=re.M)
        fixed = re.sub(r"^import slai\.v1\.", f"import {PACKAGE_PREFIX}.slai.v1.", fixed, flags=re.M)
        path.write_text(fixed)
        written.append(path)
    for pkg in [out, *[d for d in out.rglob("*") if d.is_dir() and d.name != "__pycache__"]]:
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for p in generate(args.out):
        print(p.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
