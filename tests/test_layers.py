"""The layers of the house are a checked contract (pyproject's [tool.importlinter]): front ends >
api > runtime | weights > model; an upward import or a circle fails here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")

REPO = Path(__file__).resolve().parents[1]


def test_the_layers_contract_holds(monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True) == 0


def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch, capsys):
    """The same contract on a copy of the package with one model file importing the api: broken."""
    shutil.copytree(REPO / "bagel_engine", tmp_path / "bagel_engine", ignore=shutil.ignore_patterns("assets"))
    bad = tmp_path / "bagel_engine" / "model" / "config.py"
    bad.write_text(bad.read_text() + "\nfrom bagel_engine import api  # noqa: E402,F401\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(sys.modules) if m == "bagel_engine" or m.startswith("bagel_engine.")]:
        monkeypatch.delitem(sys.modules, name)
    assert cli.lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "bagel_engine.model.config -> bagel_engine.api" in out


def module_circles(package: str = "bagel_engine") -> list[set[str]]:
    """Groups of modules that import each other in a circle (strongly connected components of the import
    graph, any import statement, lazy ones included). Package ``__init__`` modules are left out: a package
    that re-exports its parts is not a circle."""
    import grimp

    graph = grimp.build_graph(package)
    packages = {m for m in graph.modules if any(o.startswith(m + ".") for o in graph.modules)}
    nodes = sorted(graph.modules - packages)
    edges = {m: [n for n in graph.find_modules_directly_imported_by(m) if n in nodes and n != m] for m in nodes}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strong(m: str) -> None:  # Tarjan
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                strong(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = set()
            while True:
                n = stack.pop()
                on_stack.discard(n)
                group.add(n)
                if n == m:
                    break
            if len(group) > 1:
                groups.append(group)

    for m in nodes:
        if m not in index:
            strong(m)
    return groups


def test_no_import_circles():
    """No module imports itself through others (bench.runner and bench.worker did)."""
    assert module_circles() == []


def test_a_circle_is_caught(tmp_path, monkeypatch):
    shutil.copytree(REPO / "bagel_engine", tmp_path / "bagel_engine", ignore=shutil.ignore_patterns("assets"))
    runner = tmp_path / "bagel_engine" / "bench" / "runner.py"
    runner.write_text(runner.read_text() + "\n\ndef _late():\n    from bagel_engine.bench import worker  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(sys.modules) if m == "bagel_engine" or m.startswith("bagel_engine.")]:
        monkeypatch.delitem(sys.modules, name)
    assert {"bagel_engine.bench.runner", "bagel_engine.bench.worker"} in module_circles()
