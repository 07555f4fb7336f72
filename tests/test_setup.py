"""`make setup`'s bytecode step (scripts/warm_bytecode.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "warm_bytecode.py"


@pytest.fixture(scope="module")
def warm_bytecode():
    spec = importlib.util.spec_from_file_location("warm_bytecode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_entry_imports(warm_bytecode) -> None:
    """A package that renamed a module would leave its files uncompiled without failing set-up."""
    for entries in warm_bytecode.GROUPS.values():
        for entry in entries:
            warm_bytecode.import_entry(entry)


def test_warm_writes_bytecode_and_reports_what_fails(warm_bytecode, tmp_path, monkeypatch, capsys) -> None:
    package = tmp_path / "warmpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lazy.py").write_text("VALUE = 3\n")
    (package / "untouched.py").write_text("VALUE = 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # as under PYTHONDONTWRITEBYTECODE
    for name in ("warmpkg", "warmpkg.lazy"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    failed = warm_bytecode.warm(["warmpkg.lazy:VALUE", "warmpkg:missing_name", "no_such_module_here"])

    assert failed == 2
    err = capsys.readouterr().err
    assert "warmpkg:missing_name: AttributeError" in err and "no_such_module_here: ModuleNotFoundError" in err
    cached = sorted(path.name.split(".")[0] for path in (package / "__pycache__").glob("*.pyc"))
    assert cached == ["__init__", "lazy"]  # what was imported, and nothing else
    for name in ("warmpkg", "warmpkg.lazy"):
        sys.modules.pop(name, None)
