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
