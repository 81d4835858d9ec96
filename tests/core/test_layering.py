"""core/ is the engine: it never imports Qt, pyqtgraph or app/ (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
FORBIDDEN = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "app")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_qt_or_app():
    offenders = {
        str(path.relative_to(CORE.parent)): sorted(_imports(path) & set(FORBIDDEN))
        for path in CORE.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_launcher_sends_arguments_to_the_headless_cli(capsys):
    from app.launcher import main

    assert main(["methods", "--json"]) == 0
    assert '"name": "linear"' in capsys.readouterr().out


def test_cli_without_a_command_is_a_usage_error(capsys):
    from core.cli import main

    assert main(["--debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a command" in err
