"""Stub policy: committed stubs must equal what the one script generates."""

import filecmp
from pathlib import Path

import pytest

from wire import gen_protos

PB = Path(gen_protos.DEFAULT_OUT)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools")
    gen_protos.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.suffix in (".py", ".pyi"))
    committed = sorted(p.relative_to(PB) for p in PB.rglob("*.py*") if p.suffix in (".py", ".pyi"))
    assert fresh == committed
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, PB / p, shallow=False)]
    assert not stale, f"stubs are stale, run `python -m wire.gen_protos`: {stale}"


def test_every_proto_field_has_a_comment():
    for proto in Path(gen_protos.PROTO_DIR).rglob("*.proto"):
        for n, line in enumerate(proto.read_text().splitlines(), 1):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "option", "//"))
            if is_field:
                assert "//" in s, f"{proto.name}:{n} field without a comment: {s}"


def test_enum_zero_is_unspecified():
    import re
    for proto in Path(gen_protos.PROTO_DIR).rglob("*.proto"):
        for m in re.finditer(r"enum \w+ \{\s*(\w+) = 0;", proto.read_text()):
            assert m.group(1).endswith("_UNSPECIFIED"), m.group(1)
