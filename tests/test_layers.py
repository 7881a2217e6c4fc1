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
