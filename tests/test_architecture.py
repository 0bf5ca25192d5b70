"""The package boundary of docs/architecture.md, checked on the source itself.

``structlin`` (the library core) never imports ``structlin_lab`` (the experiment lab); the lab uses
the core only through public names; no module imports a private name of another package; and the
module import graph, function-level imports included, has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CORE, LAB = "structlin", "structlin_lab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {_module_name(p): p for root in (CORE, LAB) for p in (SRC / root).rglob("*.py")}


def _imports(name: str) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every import statement anywhere in ``name``."""
    path = MODULES[name]
    package = name if _is_package(path) else name.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # ``from pkg import module`` names a module; ``from pkg import func`` a name in pkg.
                out.append((sub, None) if sub in MODULES else (target, alias.name))
    return [(m, n) for m, n in out if m.split(".")[0] in (CORE, LAB)]


def _top_package(module: str) -> str:
    """The package a module belongs to for the private-name rule: ``structlin.layers``,
    ``structlin_lab.train``; top-level modules belong to their root package."""
    parts = module.split(".")
    if len(parts) >= 2 and f"{parts[0]}.{parts[1]}" in MODULES:
        if _is_package(MODULES[f"{parts[0]}.{parts[1]}"]):
            return ".".join(parts[:2])
    return parts[0]


def test_import_structlin_loads_only_core_modules():
    code = "import structlin, sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = [m for m in out.stdout.split() if m.startswith("structlin")]
    assert "structlin.layers" in loaded
    assert [m for m in loaded if m.split(".")[0] != CORE] == []
    lab_only = ("yaml", "scipy", "matplotlib", "PIL", "tiktoken")  # (torch itself loads tqdm)
    assert [m for m in out.stdout.split() if m.split(".")[0] in lab_only] == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.split(".")[0] == CORE))
def test_core_never_imports_the_lab(name):
    assert [m for m, _ in _imports(name) if m.split(".")[0] == LAB] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_package(name):
    crossing = [
        f"{module}.{item}"
        for module, item in _imports(name)
        if _top_package(module) != _top_package(name)
        and any(
            p.startswith("_") and not p.startswith("__") for p in [*module.split("."), item or ""]
        )
    ]
    assert crossing == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.split(".")[0] == LAB))
def test_lab_uses_only_public_core_names(name):
    import structlin

    for module, item in _imports(name):
        if module == CORE and item is not None:
            assert item in structlin.__all__ or item == "__version__", f"structlin.{item}"


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # Tarjan's strongly connected components; any component larger than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_function_level_and_relative_imports():
    # The rules above are only as good as _imports: it must resolve a relative import made
    # inside a function body to the module it names.
    edges = {m for m, _ in _imports("structlin_lab.cli")}
    assert "structlin_lab.train" in edges or "structlin_lab.train.config" in edges
    assert "structlin.layers.base" in {m for m, _ in _imports("structlin.layers.btt")}


def _long_functions(root: str, limit: int) -> list[str]:
    out = []
    for path in sorted((SRC / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(
                        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)"
                    )
    return out


def test_functions_fit_on_a_screen():
    # Docstrings included: a function whose docstring and body exceed this is doing too much.
    assert _long_functions(CORE, 60) == []
    assert _long_functions(LAB, 100) == []
