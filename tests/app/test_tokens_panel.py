"""The Tokens panel on tiny local models: controls from the schema and the engine's ranges, live figures,
the tokens-per-layer chart, the group view, variants, a sweep, presets, and runs kept in the session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from tests.app.conftest import close_window, wait_ready


@pytest.fixture(scope="session")
def token_models(tmp_path_factory) -> Path:
    """A library folder with a small ViT (64 px, 8 px patches: 65 tokens) and a small BERT."""
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("token-models")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=64)).eval()
    vit.save_pretrained(root / "tiny-vit")
    bert = BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128)).eval()
    bert.save_pretrained(root / "tiny-bert")
    return root


def _panel_ready(qtbot, window, folder: Path, model: str):
    assert window.library_panel.add_folder(folder)
    qtbot.waitUntil(lambda: window.library.get(folder / model) is not None, timeout=20000)
    panel = window.tokens
    window.workspace.setCurrentWidget(panel)
    assert panel.select_model(str(folder / model))
    return panel


def _wait_measured(qtbot, panel, count: int, timeout: int = 60000) -> None:
    qtbot.waitUntil(lambda: panel.measurements >= count and panel.idle(), timeout=timeout)


def test_method_controls_come_from_the_schema_with_the_engines_ranges(qtbot, make_window, token_models):
    from core.tokens import lab

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    methods = [panel.method_combo.itemData(i) for i in range(panel.method_combo.count())]
    assert methods == ["tome", "pitome"]  # the diffusion methods are not offered for a ViT
    schema = {p["name"] for p in next(m for m in lab_methods() if m["name"] == "tome")["parameters"]}
    assert set(panel._rows) == schema - {"trace_source"}
    model = lab.load_model(token_models / "tiny-vit")
    work = lab.make_workload(model, lab.LabInput())
    legal = lab.legal_ranges(model, work, "tome", {"r": 4})
    row = panel.option_row("r")
    assert (row.slider.minimum(), row.slider.maximum()) == (int(legal["r"][0]), int(legal["r"][1]))
    assert row.spin.maximum() == int(legal["r"][1])  # the value box stops there too: nothing to cap later
    panel.select_method("pitome")
    assert "margin" in panel._rows and "alpha" in panel._rows


def lab_methods():
    import core.tokens

    return core.tokens.methods()


def test_moving_the_slider_updates_figures_chart_and_groups(qtbot, make_window, token_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    row = panel.option_row("r")
    row.slider.setValue(2)
    _wait_measured(qtbot, panel, 2)
    first = panel.last_result
    assert first.options["r"] == 2
    assert panel.bar_heights() == [float(t) for t in first.tokens_per_layer]
    assert panel.bar_heights()[:2] == [65.0, 63.0]
    row.slider.setValue(6)
    qtbot.waitUntil(lambda: panel.last_result.options.get("r") == 6 and panel.idle(), timeout=60000)
    second = panel.last_result
    assert second.tokens_per_layer[-1] < first.tokens_per_layer[-1]
    assert panel.bar_heights() == [float(t) for t in second.tokens_per_layer]
    assert "speed-up" in panel.figures.text() and "cosine" in panel.figures.text()
    assert second.touched_blocks > 0 and "layers/blocks merged" in panel.blocks_label.text()
    # The group view: as many groups as the last layer leaves tokens (the class token is not drawn).
    assert panel.layer_slider.value() == panel.layer_slider.maximum()
    assert panel.shown_groups() == int(second.output_tokens) - 1
    assert panel.group_image.pixmap() is not None and not panel.group_image.pixmap().isNull()
    panel.layer_slider.setValue(0)
    assert panel.shown_groups() == 64 - 6  # after the first layer: 64 patches, 6 merged away


def test_r_zero_is_shown_as_an_error_not_a_silent_no_op(qtbot, make_window, token_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    panel.option_row("r").slider.setValue(0)
    qtbot.waitUntil(lambda: panel.last_result.options.get("r") == 0 and panel.idle(), timeout=60000)
    assert panel.last_result.touched_blocks == 0
    assert panel.blocks_label.text().startswith("No layer was changed")
    assert panel.blocks_label.objectName() == "problem"


def test_text_encoder_threshold_mode_and_text_groups(qtbot, make_window, token_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-bert")
    _wait_measured(qtbot, panel, 1)
    assert panel.text_edit.isVisible()
    panel.set_option("threshold", 0.2)
    qtbot.waitUntil(lambda: "threshold" in panel.last_result.options and panel.idle(), timeout=60000)
    result = panel.last_result
    assert "r" not in result.options
    assert result.groups is not None and result.groups.kind == "text"
    assert result.groups.counts_per_input is not None
    assert "Tokens left per input" in panel.counts_label.text()
    assert panel.group_stack.currentIndex() == 1 and "<span" in panel.group_text.toHtml()


def test_variants_sweep_python_line_and_preset(qtbot, make_window, token_models, tmp_path):
    from core.tokens.presets import load_preset

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    panel.option_row("r").slider.setValue(3)
    _wait_measured(qtbot, panel, 2)
    qtbot.mouseClick(panel.keep_button, Qt.MouseButton.LeftButton)
    panel.option_row("r").slider.setValue(8)
    qtbot.waitUntil(lambda: panel.last_result.options.get("r") == 8 and panel.idle(), timeout=60000)
    panel.keep_button.click()
    assert [v.options["r"] for v in panel.variants] == [3, 8]

    done = panel.measurements
    panel.start_sweep([0, 2, 4, 6])
    qtbot.waitUntil(lambda: panel.measurements > done and panel.idle(), timeout=120000)
    assert [r.options["r"] for r in panel.sweep_results] == [0, 2, 4, 6]
    assert panel.sweep_points_shown() == 4

    assert panel.python_line() == 'core.tokens.apply(model, method="tome", r=8, prop_attn=True, protect_cls=True)'
    saved = panel.save_preset_to(tmp_path / "mine.json")
    preset = load_preset(saved)
    assert preset.method == "tome" and preset.options["r"] == 8
    assert json.loads(saved.read_text())["model"] == str(token_models / "tiny-vit")


def test_bad_inputs_are_messages_and_earlier_results_stay(qtbot, make_window, token_models, llama_family, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    shown = panel.figures.text()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    panel.use_image(broken)
    qtbot.waitUntil(lambda: panel.errors >= 1 and panel.idle(), timeout=30000)
    assert "broken.png" in panel.error_label.text()
    assert panel.figures.text() == shown  # the earlier figures are still there
    # A model the engine cannot patch: the message names what it supports.
    window.library_panel.add_folder(llama_family["base"].parent)
    qtbot.waitUntil(lambda: window.library.get(llama_family["base"]) is not None, timeout=20000)
    assert panel.select_model(str(llama_family["base"]))
    qtbot.waitUntil(lambda: panel.errors >= 2 and panel.idle(), timeout=30000)
    assert "ViT" in panel.error_label.text() and "BERT" in panel.error_label.text()
    assert panel.figures.text() == shown


def test_runs_are_in_the_session_after_a_restart(qtbot, make_window, token_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, token_models, "tiny-vit")
    _wait_measured(qtbot, panel, 1)
    panel.option_row("r").slider.setValue(5)
    qtbot.waitUntil(lambda: panel.last_result.options.get("r") == 5 and panel.idle(), timeout=60000)
    runs = window.sessions.store.list_token_runs(window.sessions.session.id)
    assert runs and runs[0].options["r"] == 5 and runs[0].images and Path(runs[0].images[0]).is_file()
    assert "speedup" in runs[0].figures
    close_window(qtbot, window)

    again = make_window()
    wait_ready(qtbot, again)
    assert again.tokens.runs_table.rowCount() == len(runs)
    assert again.tokens.token_runs[0].options["r"] == 5
    qtbot.waitUntil(lambda: again.library.get(token_models / "tiny-vit") is not None, timeout=20000)
    assert again.tokens.token_runs[0].figures["input"]["image"].endswith(".png")
    again.tokens.restore_run(0)
    qtbot.waitUntil(lambda: again.tokens.measurements >= 1 and again.tokens.idle(), timeout=60000)
    assert again.tokens.last_result.options["r"] == 5
    assert again.tokens.last_request.image == Path(runs[0].figures["input"]["image"])  # the same picture again


def test_diffusion_unet_groups_at_a_chosen_block_and_step(qtbot, make_window, tmp_path):
    from core.tokens import tiny

    folder = tmp_path / "unets"
    tiny.build("unet", size="small").model.save_pretrained(folder / "tiny-unet")
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel_ready(qtbot, window, folder, "tiny-unet")
    _wait_measured(qtbot, panel, 1, timeout=120000)
    methods = [panel.method_combo.itemData(i) for i in range(panel.method_combo.count())]
    assert methods == ["tomesd", "todo"]
    result = panel.last_result
    assert result.groups is not None and result.groups.kind == "diffusion"
    assert panel.block_combo.isVisible() and panel.block_combo.count() == len(result.layer_labels)
    assert panel.option_row("ratio").spin.maximum() == pytest.approx(0.75)  # 1 - 1/(sx*sy), from the engine
    # Another step: the measured forward runs at that timestep.
    panel.step_spin.setValue(900)
    panel.step_spin.editingFinished.emit()
    done = panel.measurements
    qtbot.waitUntil(lambda: panel.measurements > done and panel.idle(), timeout=120000)
    assert panel.last_request.timestep == 900
    h, w = panel.last_result.groups.grid
    assert 0 < panel.shown_groups() < h * w  # ratio 0.5 merged tokens of the shown block into fewer groups
    assert panel.group_image.pixmap() is not None and not panel.group_image.pixmap().isNull()
