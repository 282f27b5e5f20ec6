"""Design section 2: only common.codec imports both the wire types (common.pb) and the core; the
executor never imports the scheduling policies."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_MODULES = [*sorted((ROOT / "scheduler_svc").glob("*.py")), ROOT / "executor_svc" / "server.py",
                   ROOT / "executor_svc" / "__main__.py"]


def runtime_imports(path: Path) -> set[str]:
    """Modules imported at run time (imports under ``if TYPE_CHECKING:`` are skipped)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_only_codec_converts():
    offenders = []
    for path in SERVICE_MODULES:
        if path.name == "bench_decision.py":  # a benchmark client, not a service
            continue
        mods = runtime_imports(path)
        if any(m.startswith("common.pb") for m in mods) and any(m.startswith("scheduler_svc.core") for m in mods):
            offenders.append(path.relative_to(ROOT))
    assert not offenders, f"import both common.pb and scheduler_svc.core: {offenders}"


def test_executor_does_not_import_policies():
    for path in (ROOT / "executor_svc" / "server.py", ROOT / "executor_svc" / "__main__.py"):
        assert not any(m.startswith("scheduler_svc.core.policies") for m in runtime_imports(path)), path
