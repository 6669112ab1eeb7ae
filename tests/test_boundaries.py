"""The device side stays small: no torch, no orchestrator code, and a selftest that works."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "protocols": {"torch", "onnx", "onnxruntime", "onnxscript", "paho", "click", "orchestrator",
                  "export", "edge_agent"},
    "edge_agent": {"torch", "onnx", "onnxscript", "orchestrator", "export"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_device_packages_never_import_heavy_or_workstation_code(package):
    bad = {f"{p.relative_to(ROOT)}: {name}" for p in (ROOT / package).rglob("*.py")
           for name in _imports(p) & FORBIDDEN[package]}
    assert not bad


def test_importing_the_agent_loads_no_torch():
    code = ("import sys, edge_agent.cli, protocols.coordinator, protocols.agent_session, "
            "protocols.journal, protocols.manifest; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'onnxscript', 'orchestrator', 'export')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_agent_selftest_command_passes():
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "selftest"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("selftest ok")


# --- the import graph: no cycle, no private name across modules ---------------------------

PACKAGES = ("protocols", "edge_agent", "export", "orchestrator")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an import statement names (``from ..x import y`` -> ``pkg.x``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(modules: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """For each module: (module it imports, name imported) for every import statement,
    at the top of the file or inside a function alike; name "" for ``import x``."""
    edges: dict[str, set[tuple[str, str]]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[module] |= {(a.name, "") for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, path.name == "__init__.py", node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        edges[module].add((submodule, ""))
                    elif source in modules:
                        edges[module].add((source, alias.name))
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_cycle():
    edges = _edges(_modules())
    graph = {m: {target for target, _ in e} for m, e in edges.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from .two import helper\n")
    (package / "two.py").write_text("def helper():\n    from .one import x\n")
    modules = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p
               for p in package.glob("*.py")}
    edges = {m: {t for t, _ in e} for m, e in _edges(modules).items()}
    assert _cycles(edges) == [["pkg.one", "pkg.two"]]


def test_no_module_imports_another_modules_private_name():
    edges = _edges(_modules())
    private = sorted(f"{module} imports {name} from {source}"
                     for module, targets in edges.items() for source, name in targets
                     if name.startswith("_") and not name.startswith("__"))
    assert private == []
