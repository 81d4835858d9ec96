"""Stable Diffusion checkpoints in the recipe editor: the ratio spelled out, block curves over IN / MID / OUT,
and the recipe the block curve writes is the one the engine runs (checked tensor by tensor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.app.conftest import wait_preflight, wait_ready
from tests.app.test_app_flow import _pick_method


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    from tests.fixtures.sd_checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("sd")
    make_checkpoint(root / "sd-a.safetensors", "sd1", seed=1)
    make_checkpoint(root / "sd-b.safetensors", "sd1", seed=2)
    return root


def test_block_curve_writes_the_recipe_the_engine_runs(qtbot, make_window, sd_folder, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    window.library_panel.add_folder(sd_folder)
    qtbot.waitUntil(lambda: len(window.library.models) == 2, timeout=20000)
    editor = window.editor
    _pick_method(window, "weighted_sum")
    a, b = str(sd_folder / "sd-a.safetensors"), str(sd_folder / "sd-b.safetensors")
    editor.add_models([a, b])
    out = tmp_path / "merged.safetensors"
    editor.output_edit.setText(str(out))
    editor.output_edit.editingFinished.emit()
    report = wait_preflight(qtbot, window)
    assert report.ok, report.problem
    assert editor.sd_kind() == "sd1"
    assert window.doc.formula() == "0.50 × sd-a + 0.50 × sd-b"
    row = editor.params.row("alpha")
    assert row.curve_button.text() == "Per block"
    from PySide6.QtWidgets import QLabel

    # The ratio's direction is written next to it, not only in a tooltip.
    assert any("30 % of model B" in label.text() for label in editor.params.widget().findChildren(QLabel))

    row.curve_button.click()
    curve = editor.curve_editor
    assert curve is not None and editor.curve_stack.currentIndex() == 1
    blocks = editor.block_names()
    assert blocks[0] == "BASE" and blocks[1] == "IN00" and blocks[13] == "M00" and blocks[-1] == "OUT11"
    assert len(curve.curves().default.anchors) == 26
    curve.drag_point("default", blocks.index("IN04"), 0.9)
    curve.drag_point("default", blocks.index("OUT11"), 0.1)
    qtbot.waitUntil(lambda: "IN04: 0.9" in editor.yaml_view.toPlainText(), timeout=5000)
    alpha = yaml.safe_load(editor.yaml_view.toPlainText())["parameters"]["alpha"]
    assert alpha["blocks"]["IN04"] == 0.9 and alpha["blocks"]["OUT11"] == 0.1 and alpha["blocks"]["M00"] == 0.5
    assert "alpha per block" in editor.formula_label.text()

    assert wait_preflight(qtbot, window).ok
    with qtbot.waitSignal(window.mergeFinished, timeout=120000) as done:
        editor.merge_button.click()
    job = done.args[0]
    assert job.status == "succeeded", job.error
    assert out.is_file()  # single files in, one single file out
    from core.merge.blocks import ldm_block

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb, safe_open(str(out), "pt") as fo:
        meta = fo.metadata()
        checked = set()
        for name in fo.keys():
            block = ldm_block(name, "sd1")
            if block not in ("IN04", "OUT11", "M00") or name.endswith("position_ids"):
                continue
            x, y, z = fa.get_tensor(name).float(), fb.get_tensor(name).float(), fo.get_tensor(name).float()
            t = {"IN04": 0.9, "OUT11": 0.1, "M00": 0.5}[block]
            torch.testing.assert_close(z, (x * (1 - t) + y * t).half().float(), rtol=0, atol=1e-3)
            checked.add(block)
    assert checked == {"IN04", "OUT11", "M00"}
    assert "sd_merge_recipe" in meta and "mergestudio_recipe" in meta
