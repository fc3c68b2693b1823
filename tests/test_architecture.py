"""The layering ARCHITECTURE.md promises, checked on the source: import graph, mode names, module size."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("elora_fed", "clients", "strategies")


def module_name(path: Path) -> str:
    """``elora_fed/sketch/gradients.py`` -> ``elora_fed.sketch.gradients``; a package is its ``__init__``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """Each module's imports of the three packages made at import time (not inside functions or TYPE_CHECKING)."""
    modules = {module_name(f): f for p in PACKAGES for f in (REPO / p).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    imported.add(sub.module)
                    imported.update(f"{sub.module}.{alias.name}" for alias in sub.names)  # a submodule
                elif isinstance(sub, ast.Import):
                    imported.update(alias.name for alias in sub.names)
        graph[name] = {m for m in imported if m in modules}
    return graph


def test_the_import_graph_has_no_cycles():
    graph, state, cycles = module_imports(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_core_imports_nothing_from_the_flower_glue():
    graph = module_imports()
    assert len(graph) > 50
    glue = {m: sorted(d for d in deps if not d.startswith("elora_fed.")) for m, deps in graph.items()}
    assert {m: d for m, d in glue.items() if m.startswith("elora_fed.") and d} == {}


def test_clients_and_server_ask_the_affinity_mode_object_never_its_name():
    pattern = re.compile(r"affinity\.mode\s*(==|!=|in\b)")
    found = [f"{f.relative_to(REPO)}:{i}" for p in ("clients", "strategies") for f in (REPO / p).rglob("*.py")
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert found == []


def test_modules_stay_small():
    """One concept per module: none over 400 lines (config sections sit beside their code)."""
    sizes = {
        f.relative_to(REPO).as_posix(): len(f.read_text().splitlines())
        for p in PACKAGES
        for f in (REPO / p).rglob("*.py")
    }
    assert {f: n for f, n in sizes.items() if n > 400} == {}


def test_the_config_sections_load_without_the_model_stack():
    """The ClientApp reads its config before it imports torch: every section module stays torch-free."""
    sections = sorted(module_name(f) for f in (REPO / "elora_fed").glob("*/config.py"))
    assert len(sections) == 7
    code = f"import sys, elora_fed.config, {', '.join(sections)}; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
