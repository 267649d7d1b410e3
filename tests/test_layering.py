"""The layering written in asirt/__init__.py, enforced: every import of every module (those
inside functions too) goes to a layer below its own, or to its own where that is allowed."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the layers, lowest first; a module belongs to the first prefix that matches it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shm_layout", ("shm_layout",)),
    ("host", ("asirt.errors", "asirt.clock", "asirt.fence", "asirt.proc", "asirt.params",
              "asirt.histogram", "asirt.progress", "asirt.topology", "asirt.system",
              "asirt.collect")),
    ("cpu", ("asirt.cpu",)),
    ("mm", ("asirt.mm",)),
    ("sync", ("asirt.sync",)),
    ("kvm", ("asirt.kvm",)),
    ("workers", ("workers",)),
    ("parent", ("asirt.scenarios", "asirt.orchestrator", "asirt.results", "asirt.plot",
                "asirt.cfloor", "asirt.kvmfloor", "asirt.comparison", "asirt.model", "asirt.cli",
                "asirt.__main__")),
    ("package", ("asirt",)),        # asirt/__init__.py itself: the base exception only
]
#: what each layer may import, besides itself (mm and sync are peers: never each other)
ALLOWED = {
    "shm_layout": set(),
    "host": {"shm_layout"},
    "cpu": {"shm_layout", "host"},
    "mm": {"shm_layout", "host", "cpu"},
    "sync": {"shm_layout", "host", "cpu"},
    "kvm": {"shm_layout", "host", "cpu", "mm", "sync"},
    "workers": {"shm_layout", "host", "cpu", "mm", "sync", "kvm"},
    "parent": {"shm_layout", "host", "cpu", "mm", "sync", "kvm", "workers", "package"},
    "package": {"host"},
}
#: third-party packages shm_layout may use (the standard library is always fine)
SHM_LAYOUT_THIRD_PARTY = {"numpy", "posix_ipc"}
OURS = ("asirt", "workers", "shm_layout")


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                return name
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layering.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from asirt import cpu" imports the submodule asirt.cpu (not the package's names)
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            out += [(node.lineno, m) for m in subs] if subs else [(node.lineno, mod)]
    return out


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def sources() -> list[Path]:
    return sorted(p for top in OURS for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_respects_the_layering(path: Path):
    me = module_name(path)
    mine = layer_of(me)
    bad = []
    for line, target in imports_of(path):
        top = target.split(".")[0]
        if top not in OURS:
            if (mine == "shm_layout" and top not in sys.stdlib_module_names
                    and top not in SHM_LAYOUT_THIRD_PARTY and top != "__future__"):
                bad.append(f"line {line}: shm_layout imports {target}")
            continue
        theirs = layer_of(target)
        if theirs != mine and theirs not in ALLOWED[mine]:
            bad.append(f"line {line}: {me} ({mine}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_the_kvm_device_layer_needs_nothing_of_the_runtime():
    """/dev/kvm's ABI and a real guest: the standard library, asirt.errors and asirt.proc
    (tgkill; it imports nothing of asirt) only."""
    device = [ROOT / "asirt" / "kvm" / f for f in ("api.py", "vm.py", "guest.py")]
    for path in (p for p in device if p.exists()):
        ours = [t for _, t in imports_of(path) if t.split(".")[0] in OURS]
        assert all(t in ("asirt.errors", "asirt.proc") or t.startswith("asirt.kvm.")
                   for t in ours), (path, ours)
    assert not [t for _, t in imports_of(ROOT / "asirt" / "proc.py")
                if t.split(".")[0] in OURS]


def test_the_checker_reads_no_protocol_object():
    """The checkers (asirt.cpu.checks) import nothing of the protocols they check."""
    ours = [t for _, t in imports_of(ROOT / "asirt" / "cpu" / "checks.py")]
    assert not [t for t in ours if t.startswith(("asirt.sync", "asirt.mm", "asirt.kvm"))]


def test_the_layering_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a cpu-layer module importing the stun handshake."""
    fake = ROOT / "asirt" / "cpu" / "_layering_probe.py"
    fake.write_text("from asirt.sync.stun import Stun\n")
    try:
        with pytest.raises(AssertionError, match="imports asirt.sync.stun"):
            test_every_import_respects_the_layering(fake)
    finally:
        fake.unlink()
