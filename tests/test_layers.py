"""Which way imports go between the folders of ``lever_plugins`` (read from the source, nothing imported).

Every ``import`` / ``from ... import`` of every module counts, those inside functions included: a
lazy import is still a dependency. The folders and top-level modules must form a graph without
cycles; ``datasets/`` is the data layer below the plugin pipelines and tasks, ``modules/`` is pure
torch, and the validation layer (schema, schemas, catalog, recipes) imports no torch at all.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lever_plugins"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in ``path``; ``from a import b`` yields ``a`` and ``a.b``."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((name, node.lineno))
            out.extend((f"{name}.{alias.name}", node.lineno) for alias in node.names)
    return out


def folder_of(module: str) -> str | None:
    """The node of ``lever_plugins`` a module belongs to: its sub-package (folder), or the top-level module
    itself (``checkpoints``, ``recipes``, ...); None for the package itself and for other packages."""
    parts = module.split(".")
    if parts[0] != "lever_plugins" or len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return parts[1]
    return None


def folder_imports() -> dict[str, dict[str, list[str]]]:
    """``{folder: {imported folder: ["file:line", ...]}}`` over every module under ``lever_plugins/``."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        source = folder_of(_module_name(path))
        if source is None:
            continue
        for name, line in imported_names(path):
            target = folder_of(name)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target is not None and target != source and where not in edges[source][target]:
                edges[source][target].append(where)
    return edges


def find_cycle(edges: dict[str, dict[str, list[str]]]) -> list[str]:
    """One cycle of the folder graph as ``[a, b, ..., a]``; empty when there is none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_parser_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    root = tmp_path / "lever_plugins"
    (root / "icl").mkdir(parents=True)
    (root / "datasets").mkdir()
    (root / "icl" / "a.py").write_text("def f():\n    from lever_plugins.datasets import files\n")
    (root / "datasets" / "b.py").write_text("from ..icl.a import f\nimport lever_plugins.icl\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", root)
    edges = folder_imports()
    assert set(edges["icl"]) == {"datasets"} and set(edges["datasets"]) == {"icl"}
    assert edges["icl"]["datasets"] == ["lever_plugins/icl/a.py:2"]
    assert find_cycle(edges) == ["datasets", "icl", "datasets"]


PURE_PYTHON = ("schema", "schemas", "catalog", "recipes", "io", "run_dir")  # what `validate` / `--dry-run` import


@pytest.mark.parametrize("node", PURE_PYTHON)
def test_the_validation_layer_imports_no_torch_and_nothing_above_it(node):
    """``lever-plugins validate`` stays fast: its modules import neither torch, LAVIS nor transformers (not even
    lazily) and nothing of lever_plugins outside this layer."""
    paths = sorted((PACKAGE / node).rglob("*.py")) if (PACKAGE / node).is_dir() else [PACKAGE / f"{node}.py"]
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in paths
        for name, line in imported_names(path)
        if name.split(".")[0] in ("torch", "lavis", "transformers", "timm")
        or (folder_of(name) is not None and folder_of(name) not in PURE_PYTHON)
    ]
    assert not offending, "\n".join(offending)


def test_folder_graph_has_no_cycle():
    edges = folder_imports()
    cycle = find_cycle(edges)
    where = [f"{a} -> {b}: {', '.join(edges[a][b][:3])}" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle between folders:\n" + "\n".join(where)


@pytest.mark.parametrize("forbidden", ["tasks", "icl", "models", "launch"])
def test_datasets_is_below_the_pipelines_and_tasks(forbidden):
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / "datasets").rglob("*.py"))
        for name, line in imported_names(path)
        if name == f"lever_plugins.{forbidden}" or name.startswith(f"lever_plugins.{forbidden}.")
    ]
    assert not offending, "\n".join(offending)


def test_modules_import_no_lavis():
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / "modules").rglob("*.py"))
        for name, line in imported_names(path)
        if name.split(".")[0] == "lavis" or name in ("lever_plugins.compat", "lever_plugins.compat.import_lavis")
    ]
    assert not offending, "\n".join(offending)
