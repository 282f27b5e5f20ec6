"""The layout's rules, read from the code's imports (docs/architecture.md).

Layers, arrows only downward, no cycles (imports under ``if TYPE_CHECKING:`` count too):

    4  slai_serve                                   the product command and the local launcher
    3  scheduler_svc  executor_svc  gateway  simulator   services (and the simulator), never each other
    2  wire  telemetry                              wire conversion, RPC plumbing, tracing and metrics
    1  scheduler_svc.core  contract                 the pure core and the scheduler <-> executor contract

``benchmarks/`` and ``tests/`` stand outside: they may import anything and nothing imports them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "scheduler_svc", "executor_svc", "gateway", "wire", "telemetry", "simulator", "slai_serve")


def unit_of(module: str) -> str | None:
    """The layer unit a module belongs to (``scheduler_svc.core`` is its own unit)."""
    if module == "scheduler_svc.core" or module.startswith("scheduler_svc.core."):
        return "scheduler_svc.core"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


LAYER = {"contract": 1, "scheduler_svc.core": 1, "wire": 2, "telemetry": 2, "scheduler_svc": 3, "executor_svc": 3,
         "gateway": 3, "simulator": 3, "slai_serve": 4}
# Units on one layer may not import each other, except these arrows (same layer, one way only).
SIDEWAYS = {("scheduler_svc.core", "contract"), ("wire", "telemetry")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module of ours that ``path`` imports, at run time or for type checking."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if unit_of(m) is not None}


def all_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "pb" in path.relative_to(ROOT).parts:  # generated stubs
                continue
            mods[module_name(path)] = path
    return mods


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for imp in imports_of(path, name):
            # `from pkg import mod` names a module; `from mod import name` names the module itself
            target = imp if imp in mods else imp.rpartition(".")[0] if imp.rpartition(".")[0] in mods else None
            if target and target != name:
                edges[name].add(target)
    return edges


def test_arrows_only_point_down():
    wrong = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = unit_of(src), unit_of(dst)
            if a == b:
                continue
            if LAYER[b] > LAYER[a] or (LAYER[b] == LAYER[a] and (a, b) not in SIDEWAYS):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_services_do_not_import_each_other_or_benchmarks():
    for src, targets in graph().items():
        assert not any(t.startswith("benchmarks") for t in targets), src
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in PACKAGES:
            text = path.read_text()
            assert "from benchmarks" not in text and "import benchmarks" not in text, rel


def test_the_executor_sees_only_the_contract_of_the_scheduler():
    for src, targets in graph().items():
        if unit_of(src) == "executor_svc":
            assert not any(unit_of(t) == "scheduler_svc.core" for t in targets), src


def test_layer_table_covers_every_package():
    assert set(LAYER) == {*PACKAGES, "scheduler_svc.core"}
    assert all((ROOT / p / "__init__.py").is_file() for p in PACKAGES)
