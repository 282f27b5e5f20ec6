"""The scheduling core imports only the standard library and reads no clock, so the simulator
and the core tests can drive it anywhere (the simulator's own imports: tests/test_import_contracts.py)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("grpc", "google.protobuf", "torch", "numpy", "opentelemetry")


def _modules_after_import(module: str) -> list[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_core_imports_only_stdlib():
    loaded = _modules_after_import("scheduler_svc.core")
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"scheduler_svc.core pulled in {bad}"


def test_core_does_not_read_a_clock():
    # time is injected: no module of the core may import time or datetime
    for path in (ROOT / "scheduler_svc" / "core").rglob("*.py"):
        text = path.read_text()
        assert "import time" not in text and "datetime" not in text, f"{path} reads a clock"
