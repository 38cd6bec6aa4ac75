"""The import graph: the driver side never loads torch, and no module imports itself back.

A driver (the CLI, the Prefect flows, the scheduler, the store) runs on a head node that may
have no GPU build of torch at all and must start in a second; only the tile workers and
training load the model's engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER_MODULES = [
    "pipeline", "pipeline.cards", "pipeline.config", "pipeline.display", "pipeline.job",
    "pipeline.stages", "pipeline.local", "pipeline.store", "pipeline.io", "pipeline.io.exports",
    "pipeline.io.location", "pipeline.engine.tiling", "pipeline.engine.scheduler",
    "pipeline.engine.pool", "pipeline.engine.tissue", "pipeline.engine.normalization",
    "pipeline.workers", "pipeline.cluster", "flows.cli", "flows.segment", "flows.tasks", "flows.discover",
    "flows.outputs", "flows.report", "flows.schedule",
]  # fmt: skip

BLOCK_TORCH = """
import importlib, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch imported on the driver side ({name})")

sys.meta_path.insert(0, NoTorch())
for module in sys.argv[1:]:
    importlib.import_module(module)
"""


def test_driver_side_modules_import_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *DRIVER_MODULES], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of ours that `path` imports anywhere (a lazy import inside a function
    counts: two modules that need each other are one responsibility, or a missing third)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def test_no_import_cycle() -> None:
    paths = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("flows/**/*.py")]
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in paths}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if dep.startswith(module + "."):  # a package re-exporting its own modules
                continue
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*trail, module, dep])}"
            if dep not in state:
                visit(dep, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
