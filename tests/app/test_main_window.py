"""The first window opens, checks a recipe in a worker and shows the plan."""

from __future__ import annotations

import sys

import pytest
import yaml

pytest.importorskip("pytestqt")


def test_window_checks_recipe(qtbot, llama_family, tmp_path):
    from app.main import MainWindow

    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama_family["a"]), "parameters": {"weight": 0.5}},
            {"model": str(llama_family["b"]), "parameters": {"weight": 0.5}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    assert window.windowTitle() == "Merge Studio"
    window.open_recipe(path)
    qtbot.waitUntil(lambda: "OK" in window.plan_view.toPlainText(), timeout=20000)
    assert "linear" in window.plan_view.toPlainText()
    window._thread.wait(5000)


def test_window_shows_errors(qtbot, tmp_path):
    from app.main import MainWindow

    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: tie\nmodels:\n  - model: /nope\n")
    window = MainWindow()
    qtbot.addWidget(window)
    window.open_recipe(path)
    qtbot.waitUntil(lambda: "error" in window.plan_view.toPlainText(), timeout=20000)
    assert "ties" in window.plan_view.toPlainText()  # the nearest method is suggested
    window._thread.wait(5000)


def test_importing_app_and_core_does_not_import_torch():
    import subprocess

    code = "import sys, app, app.main, core, core.merge, core.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
