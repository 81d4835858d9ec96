"""The Inspect panel on tiny local models: attention heat maps (text, ViT with token merging, diffusion
cross-attention), token counts and premiums, weight differences, exports, errors, and results in the session.

The panel is built standalone, as the window builds it: ``InspectPanel(library, sessions)`` with the
library's real ModelInfo records and a real SessionStore on a temporary file.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PySide6.QtCore import Qt

from core.events import Event

TEXT = "the cat sat on the mat"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_family, llama_family) -> dict[str, Path]:
    """A tiny BERT (with tokenizer), one without a tokenizer, a tiny ViT and a tiny SD pipeline."""
    import torch
    from transformers import ViTConfig, ViTModel

    from tests.fixtures.tiny_models import make_base
    from tests.fixtures.tiny_pipelines import make_generation_pipeline

    root = tmp_path_factory.mktemp("inspect-models")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=4, intermediate_size=64)).eval()
    vit.save_pretrained(root / "tiny-vit")
    return {
        "bert": bert_family["base"],
        "notok": make_base(root / "bert-without-tokenizer", arch="bert", tokenizer=False),
        "vit": root / "tiny-vit",
        "pipe": make_generation_pipeline(root / "tiny-pipe", 0),
        "base": llama_family["base"],
        "a": llama_family["a"],
        "b": llama_family["b"],
    }


class _Library:
    """What the panel reads of the window's library: ``.models`` and ``.events.models_changed``."""

    def __init__(self, paths) -> None:
        from core.io.catalog import describe_model

        self.models = [describe_model(p, source="test") for p in paths]
        self.events = SimpleNamespace(models_changed=Event("models_changed"))


@pytest.fixture(scope="module")
def library(models) -> _Library:
    return _Library(models.values())


@pytest.fixture
def sessions(tmp_path):
    from core.sessions.store import SessionStore

    store = SessionStore.open(tmp_path / "sessions.db")
    yield SimpleNamespace(store=store, session=store.create_session("inspect"))
    store.close()


@pytest.fixture
def panel(qtbot, library, sessions):
    from app.inspect_panel import InspectPanel
    from app.workers import running_workers

    widget = InspectPanel(library, sessions)
    qtbot.addWidget(widget)
    widget.resize(1200, 800)
    widget.show()
    yield widget
    widget.stop()
    for worker in running_workers():
        worker.wait(30000)
    qtbot.waitUntil(widget.idle, timeout=30000)


def _wait(qtbot, tab, results: int, timeout: int = 60000) -> None:
    qtbot.waitUntil(lambda: (tab.results >= results or tab.errors > 0) and tab.idle(), timeout=timeout)
    assert tab.errors == 0, tab.problem_label.text()


def _click_cell(qtbot, view, row: int, col: int) -> None:
    """A real left click on the heat map cell's centre."""
    pos = view.plot.mapFromScene(view.scene_pos_of(row, col))
    qtbot.mouseClick(view.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)


def _text_capture(qtbot, panel, models, layers: str = "0, 1"):
    tab = panel.attention
    assert tab.select_model(str(models["bert"]))
    tab.text_edit.setText(TEXT)
    tab.layers_edit.setText(layers)
    done = tab.results
    qtbot.mouseClick(tab.capture_button, Qt.MouseButton.LeftButton)
    _wait(qtbot, tab, done + 1)
    return tab


# ----------------------------------------------------------------------------- attention


def test_text_attention_heatmap_holds_the_maps_with_the_tokens_as_labels(qtbot, panel, models, sessions):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tab = _text_capture(qtbot, panel, models)
    result = tab.result
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    ids = tokenizer(TEXT)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    n = len(tokens)
    assert result.tokens == tokens and result.layers == [0, 1]
    # The maps are the model's own attention (eager, output_attentions), layer by layer.
    model = AutoModel.from_pretrained(models["bert"], attn_implementation="eager").eval()
    with torch.no_grad():
        own = model(torch.tensor([ids]), output_attentions=True).attentions
    for layer in (0, 1):
        np.testing.assert_allclose(result.maps[layer], own[layer][0].numpy(), atol=1e-5)

    view = tab.heatmap
    assert view.image_data().shape == (n, n)
    assert [label for _, label in view.ticks("left")] == tokens
    assert [label for _, label in view.ticks("bottom")] == tokens
    assert [pos for pos, _ in view.ticks("left")] == [i + 0.5 for i in range(n)]  # cell centres
    # Default: the first layer, the mean of heads.
    np.testing.assert_allclose(view.image_data(), result.maps[0].mean(axis=0), atol=1e-6)
    tab.select(head=2)
    np.testing.assert_allclose(view.image_data(), result.maps[0][2], atol=1e-6)
    tab.select(layer=1, head="max")
    np.testing.assert_allclose(view.image_data(), result.maps[1].max(axis=0), atol=1e-6)
    tab.select(layer="all", head="mean")
    np.testing.assert_allclose(view.image_data(), (result.maps[0].mean(0) + result.maps[1].mean(0)) / 2, atol=1e-6)
    tab.select(layer="all", head=1)
    np.testing.assert_allclose(view.image_data(), (result.maps[0][1] + result.maps[1][1]) / 2, atol=1e-6)

    # A click on a cell reports that (query, key) cell.
    with qtbot.waitSignal(view.cellClicked, timeout=5000) as clicked:
        _click_cell(qtbot, view, 2, 3)
    assert clicked.args == [2, 3]

    # Kept in the session: a small summary and the maps as .npz.
    records = sessions.store.list_inspections(sessions.session.id, kind="attention")
    assert len(records) == 1
    record = records[0]
    assert record.models == [str(models["bert"])] and record.settings["layers"] == [0, 1]
    assert record.results["tokens"] == tokens and "maps" not in record.results
    npz = Path(record.files[0])
    assert npz.parent == sessions.store.inspection_dir(sessions.session.id)
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["layer_1"], result.maps[1])
        assert sorted(k for k in data.files if k.startswith("layer_")) == ["layer_0", "layer_1"]

    # Reloading the earlier result shows the same maps.
    tab.result = None
    tab.select(layer=0, head="mean")
    assert tab.earlier_list.count() == 1
    tab.reload(0)
    assert tab.result.tokens == tokens
    tab.select(layer=1, head=3)
    np.testing.assert_allclose(view.image_data(), result.maps[1][3], atol=1e-6)


def test_every_plot_exports_png_and_svg(qtbot, panel, models, tmp_path):
    from app.plots import ExportError

    tab = _text_capture(qtbot, panel, models, layers="0")
    view = tab.heatmap
    png, svg = view.export(tmp_path / "map.png"), view.export(tmp_path / "map.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    text = svg.read_text(encoding="utf-8")
    assert text.startswith("<?xml") and "<svg" in text and "<image" in text  # the heat map is in the drawing
    # The Export… button: a non-native dialog; choosing a file writes it.
    qtbot.mouseClick(view.export_button, Qt.MouseButton.LeftButton)
    dialog = view.export_dialog
    assert dialog is not None and dialog.testOption(dialog.Option.DontUseNativeDialog)
    dialog.selectFile(str(tmp_path / "chosen.svg"))
    dialog.accept()
    qtbot.waitUntil(lambda: (tmp_path / "chosen.svg").is_file(), timeout=5000)
    assert "<svg" in (tmp_path / "chosen.svg").read_text(encoding="utf-8")
    # Another suffix: one sentence, shown in the tab, nothing written.
    with pytest.raises(ExportError, match=r"map\.jpg.*\.png.*\.svg"):
        view.export(tmp_path / "map.jpg")
    view._export_chosen(str(tmp_path / "other.bmp"))
    assert "other.bmp" in tab.problem_label.text() and not (tmp_path / "other.bmp").exists()
    # The overlay and the bar chart export the same way.
    from app.plots import BarChartView, ImageOverlayView

    overlay, bars = ImageOverlayView(), BarChartView()
    overlay.set_data(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0).random((4, 4)),
                     np.arange(16).reshape(4, 4) // 2)
    bars.set_data([1.0, 2.5], ["en", "fr"], reference=1.0)
    for plot, name in ((overlay, "overlay"), (bars, "bars")):
        qtbot.addWidget(plot)
        plot.resize(400, 300)
        with pytest.raises(ExportError, match="not been shown"):
            plot.export(tmp_path / f"{name}.png")
        plot.show()
        qtbot.waitExposed(plot)
        assert plot.export(tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in plot.export(tmp_path / f"{name}.svg").read_text(encoding="utf-8")


def test_vision_attention_overlay_with_token_merging_groups(qtbot, panel, models, sessions):
    from app.inspect_common import ROLLOUT

    tab = panel.attention
    assert tab.select_model(str(models["vit"]))
    assert tab.current_kind() == "vision"
    tab.r_spin.setValue(2)
    qtbot.mouseClick(tab.capture_button, Qt.MouseButton.LeftButton)
    _wait(qtbot, tab, 1)
    result = tab.result
    assert result.grid == (4, 4) and result.groups is not None
    assert result.tokens_per_layer == [17, 15, 13]  # ToMe r=2: two tokens fewer after every layer
    view = tab.overlay
    np.testing.assert_array_equal(view.rgb, result.image)
    assert tab.layer_combo.currentData() == ROLLOUT
    np.testing.assert_allclose(view.overlay_data(), result.rollout, atol=1e-6)
    tab.select(layer=1, head="mean")
    np.testing.assert_allclose(view.overlay_data(), result.cls_attention[1].mean(axis=0), atol=1e-6)
    tab.select(layer=2, head=3)
    np.testing.assert_allclose(view.overlay_data(), result.cls_attention[2][3], atol=1e-6)
    # The outlines are drawn between the merged groups: as many groups as patch tokens are left.
    np.testing.assert_array_equal(view.groups, result.groups)
    assert len(np.unique(view.groups)) == result.output_tokens - 1 == 17 - 6 - 1
    edges = view.outline.image[..., 3] > 0
    ids = np.repeat(np.repeat(result.groups, 8, axis=0), 8, axis=1)  # 8 px per patch
    expected = np.zeros_like(edges)
    expected[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    expected[1:, :] |= ids[1:, :] != ids[:-1, :]
    np.testing.assert_array_equal(edges, expected)
    view.alpha_slider.setValue(30)
    assert view.overlay.opacity() == pytest.approx(0.3)
    record = sessions.store.list_inspections(sessions.session.id, kind="vision-attention")[0]
    assert record.settings["token_merging"] == {"method": "tome", "r": 2}
    assert record.results["tokens_per_layer"] == [17, 15, 13] and Path(record.files[0]).is_file()


def test_diffusion_cross_attention_token_list_and_stop(qtbot, panel, models, sessions):
    tab = panel.attention
    assert tab.select_model(str(models["pipe"]))
    assert tab.current_kind() == "diffusion"
    tab.text_edit.setText("a red house by the river")
    tab.steps_spin.setValue(2)
    tab.size_spin.setValue(64)
    tab.height_spin.setValue(96)
    tab.timesteps_edit.setText("1")
    tab.level_combo.setCurrentIndex(tab.level_combo.findData("up"))
    qtbot.mouseClick(tab.capture_button, Qt.MouseButton.LeftButton)
    _wait(qtbot, tab, 1, timeout=120000)
    result = tab.result
    assert tab.token_list.count() == len(result.tokens) == 6
    assert result.maps.shape == (6, 96, 64)  # [T, H, W]: height 96, width 64
    assert result.timesteps == [1] and result.layers and all(n.startswith("up_blocks") for n in result.layers)
    np.testing.assert_array_equal(tab.overlay.rgb, result.image)
    np.testing.assert_allclose(tab.overlay.overlay_data(), result.maps[0], atol=1e-6)
    item = tab.token_list.item(5)
    where = tab.token_list.visualItemRect(item).center()
    qtbot.mouseClick(tab.token_list.viewport(), Qt.MouseButton.LeftButton, pos=where)
    assert tab.token_list.currentRow() == 5
    np.testing.assert_allclose(tab.overlay.overlay_data(), result.maps[5], atol=1e-6)
    assert result.tokens[5].startswith("river") and "river" in tab.overlay.title
    assert len(sessions.store.list_inspections(sessions.session.id, kind="cross-attention")) == 1

    # Stop: a long run stops at the next step, nothing is kept, and the tab captures again afterwards.
    tab.steps_spin.setValue(200)
    tab.capture()
    qtbot.waitUntil(lambda: tab.progress.value() > 0, timeout=60000)
    qtbot.mouseClick(tab.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(tab.idle, timeout=60000)
    assert tab.worker is None and tab.results == 1 and tab.status_label.text().startswith("Stopped")
    assert len(sessions.store.list_inspections(sessions.session.id, kind="cross-attention")) == 1
    assert tab.capture_button.isEnabled()


# ----------------------------------------------------------------------------- tokens


def test_token_counts_equal_the_tokenizers_and_errors_stay_in_their_row(qtbot, panel, models, sessions):
    from transformers import AutoTokenizer

    from app.inspect_common import OVER_LIMIT

    tab = panel.tokens
    tab.model_list.set_checked([str(models["bert"]), str(models["base"]), str(models["notok"])])
    long_text = " ".join(["the cat sat on the mat"] * 30)  # past the tiny tokenizers' 128 tokens
    tab.text_edit.setPlainText(long_text)
    qtbot.mouseClick(tab.count_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.results >= 1 and tab.idle(), timeout=60000)
    by_model = {c.model: (row, c) for row, c in enumerate(tab.counts)}
    assert set(by_model) == {str(models["bert"]), str(models["base"]), str(models["notok"])}
    for key in ("bert", "base"):
        row, count = by_model[str(models[key])]
        tokenizer = AutoTokenizer.from_pretrained(models[key])
        ids = tokenizer(long_text)["input_ids"]
        assert count.ids == ids
        assert tab.table.item(row, 2).text() == str(len(ids))
        assert tab.table.item(row, 1).text() == type(tokenizer).__name__
        assert tab.table.item(row, 3).text() == f"{len(long_text) / sum(1 for s in count.special if not s):.2f}"
        assert tab.table.item(row, 4).text().startswith(f"{tokenizer.model_max_length} (cut at token 128")
    # The folder without a tokenizer: its own row says why, naming the folder; the others still show.
    row, bad = by_model[str(models["notok"])]
    assert bad.error and str(models["notok"]) in tab.table.item(row, 1).text()
    assert str(models["notok"]) in tab.problem_label.text()
    # The pieces view: every piece once, the ones past the limit on red.
    html_text = tab.pieces.toHtml()
    _, bert = by_model[str(models["bert"])]
    from app.inspect_tokens import pieces_html

    snippet = pieces_html(bert)
    assert snippet.count(f"background-color:{OVER_LIMIT}") == bert.count - 128
    assert snippet.count("<span") == bert.count
    assert OVER_LIMIT in html_text and models["bert"].name in html_text and models["notok"].name in html_text
    record = sessions.store.list_inspections(sessions.session.id, kind="tokens")[0]
    assert {c["model"]: c["count"] for c in record.results["counts"] if not c["error"]} == {
        str(models["bert"]): bert.count, str(models["base"]): by_model[str(models["base"])][1].count}


def test_parallel_text_premium_table_and_chart(qtbot, panel, models, sessions):
    from core.inspect.tokenizers import parallel_texts, tokenize
    from transformers import AutoTokenizer

    tab = panel.tokens
    tab.model_list.set_checked([str(models["bert"]), str(models["base"])])
    qtbot.mouseClick(tab.parallel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.results >= 1 and tab.idle(), timeout=60000)
    texts = parallel_texts()
    languages = tab.premium["languages"]
    assert tab.premium_table.rowCount() == len(languages) >= 20 and tab.premium_table.columnCount() == 2
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    counts = {c: len(tokenizer(texts[c]["text"], add_special_tokens=False)["input_ids"]) for c in languages}
    tab.premium_model.setCurrentIndex(tab.premium_model.findData(1))  # the llama tokenizer's column
    expected = [counts[c] / counts["en"] for c in languages]
    assert tab.chart.bar_heights() == pytest.approx(expected)
    assert tab.chart.bar_heights()[languages.index("en")] == 1.0
    row = languages.index("fr")
    assert tab.premium_table.item(row, 1).text() == f"{expected[row]:.2f}"
    assert tokenize(tokenizer, texts["fr"]["text"], add_special_tokens=False).content_count == counts["fr"]
    record = sessions.store.list_inspections(sessions.session.id, kind="tokens")[0]
    assert record.settings["what"] == "token premium" and record.results["languages"] == languages


# ----------------------------------------------------------------------------- weights


def test_weights_heatmap_equals_the_diff_and_a_click_shows_the_tensor(qtbot, panel, models, sessions):
    from safetensors.numpy import load_file

    from app.inspect_weights import short_labels
    from core.inspect.weights import weight_diff

    tab = panel.weights
    tab.model_list.set_checked([str(models["a"]), str(models["b"])])
    tab.set_base(str(models["base"]))
    qtbot.mouseClick(tab.compare_button, Qt.MouseButton.LeftButton)
    _wait(qtbot, tab, 1)
    reference = weight_diff([str(models["a"]), str(models["b"])], str(models["base"]))
    for metric in ("rel_l2", "top10_share", "sign_conflict", "cosine"):
        for model in ((0, 1) if metric in ("rel_l2", "top10_share") else (0,)):
            tab.select(metric=metric, model=model)
            expected, layers, modules = reference.heatmap(metric, model)
            shown = tab.heatmap.image_data()
            assert shown.shape == expected.shape == (len(layers), len(modules))
            np.testing.assert_array_equal(np.isnan(shown), np.isnan(expected))
            np.testing.assert_allclose(shown[~np.isnan(shown)], expected[~np.isnan(expected)], rtol=1e-6)
    assert tab.heatmap.row_labels == [str(layer) for layer in reference.layers]
    assert tab.heatmap.col_labels == short_labels(reference.modules)
    assert len(set(tab.heatmap.col_labels)) == len(reference.modules)
    shown_ticks = tab.heatmap.ticks("bottom")  # thinned to what fits, every k-th from the first
    assert shown_ticks and shown_ticks[0] == (0.5, tab.heatmap.col_labels[0])

    tab.select(metric="rel_l2", model=1)
    row, col = 1, 2
    _click_cell(qtbot, tab.heatmap, row, col)
    cell = tab.cell_rows()
    tensor = reference.cell(reference.layers[row], reference.modules[col])
    assert cell["tensor"] == tensor.name
    # An independent figure: ||b - base|| / ||base|| for that tensor, from the files.
    base_t = load_file(str(models["base"] / "model.safetensors"))[tensor.name].astype(np.float64)
    b_t = load_file(str(models["b"] / "model.safetensors"))[tensor.name].astype(np.float64)
    rel = np.linalg.norm(b_t - base_t) / np.linalg.norm(base_t)
    assert float(cell[f"relative L2 · {models['b'].name}"]) == pytest.approx(rel, rel=1e-5)
    assert float(cell["sign conflict"]) == pytest.approx(tensor.sign_conflict, rel=1e-5)

    record = sessions.store.list_inspections(sessions.session.id, kind="weights")[0]
    assert record.settings["base"] == str(models["base"]) and record.results["layers"] == reference.layers
    saved = json.loads(Path(record.files[0]).read_text(encoding="utf-8"))
    assert len(saved["tensors"]) == len(reference.tensors)
    # Reloading the earlier comparison shows the same heat map.
    tab.diff = None
    tab.reload(0)
    tab.select(metric="top10_share", model=0)
    expected = reference.heatmap("top10_share", 0)[0]
    shown = tab.heatmap.image_data()
    np.testing.assert_allclose(shown[~np.isnan(shown)], expected[~np.isnan(expected)], rtol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_sentence_and_the_panel_stays_usable(qtbot, panel, models, sessions):
    tab = panel.attention
    problems = []
    panel.problem.connect(problems.append)
    # A model folder without a tokenizer: the sentence names the folder.
    assert tab.select_model(str(models["notok"]))
    qtbot.mouseClick(tab.capture_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tab.errors >= 1 and tab.idle(), timeout=60000)
    message = tab.problem_label.text()
    assert str(models["notok"]) in message and "tokenizer" in message and "Traceback" not in message
    assert "\n" not in message and problems and problems[-1] == message
    assert tab.capture_button.isEnabled() and tab.results == 0
    # A bad layers field and an out-of-range layer: sentences, no worker for the first.
    assert tab.select_model(str(models["bert"]))
    tab.layers_edit.setText("one, two")
    assert tab.capture() is None and "layers field" in tab.problem_label.text()
    tab.layers_edit.setText("7")
    tab.capture()
    qtbot.waitUntil(lambda: tab.errors >= 3 and tab.idle(), timeout=60000)
    assert "7" in tab.problem_label.text()
    # Still usable: a good capture afterwards clears the problem and shows its maps.
    tab.layers_edit.setText("")
    tab.errors = 0
    _text_capture(qtbot, panel, models, layers="")
    assert not tab.problem_label.isVisible() and tab.result.layers == [0, 1, 2, 3]
    assert tab.heatmap.image_data().shape == (len(tab.result.tokens),) * 2
    # Weights with a single model and no base: a sentence, nothing started.
    weights = panel.weights
    weights.model_list.set_checked([str(models["a"])])
    weights.set_base(None)
    assert weights.compare() is None and "two models" in weights.problem_label.text()
    # Only the good capture is in the session.
    assert len(sessions.store.list_inspections(sessions.session.id)) == 1


def test_library_changes_refill_the_pickers(qtbot, panel, library, models):
    from core.io.catalog import describe_model

    tab = panel.attention
    kinds = sorted({tab.model_combo.itemData(i)[1] for i in range(tab.model_combo.count())})
    assert kinds == ["diffusion", "text", "vision"]
    before = panel.weights.model_list.count()
    saved = list(library.models)
    try:
        library.models = [describe_model(models["bert"], source="test")]
        library.events.models_changed.emit()
        assert tab.model_combo.count() == 1 and panel.weights.model_list.count() == 1
        assert panel.weights.base_combo.count() == 2  # "(none)" and the one model
    finally:
        library.models = saved
        library.events.models_changed.emit()
    assert panel.weights.model_list.count() == before


def test_parse_layers_and_short_labels():
    from app.inspect_common import parse_layers
    from app.inspect_weights import short_labels

    assert short_labels(["self_attn.q_proj.weight", "mlp.q_proj.weight", "mlp.up_proj.weight", "mlp.up_proj.bias"]) == [
        "self_attn.q_proj", "mlp.q_proj", "up_proj", "up_proj.bias"]
    assert short_labels(["input_layernorm.weight", "post_attention_layernorm.weight"]) == [
        "input_norm", "post_attention_norm"]

    assert parse_layers("") is None and parse_layers(" all ") is None
    assert parse_layers("3, 0, 4-6") == [0, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="layers field"):
        parse_layers("6-4")
    assert parse_layers("0-9") == list(range(10))


# ----------------------------------------------------------------------------- in the window


def test_in_the_window_results_survive_a_restart(qtbot, make_window, bert_family, tmp_path):
    import shutil

    from tests.app.conftest import close_window, wait_ready

    folder = tmp_path / "library"
    folder.mkdir()
    bert = folder / "tiny-bert"
    shutil.copytree(bert_family["base"], bert)
    window = make_window()
    wait_ready(qtbot, window)
    assert window.library_panel.add_folder(folder)
    qtbot.waitUntil(lambda: window.library.get(bert) is not None, timeout=20000)
    panel = window.inspect
    window.workspace.setCurrentWidget(panel)
    tab = panel.attention
    qtbot.waitUntil(lambda: tab.select_model(str(bert)), timeout=20000)  # the library's models_changed refilled it
    tab.text_edit.setText(TEXT)
    tab.layers_edit.setText("1")
    qtbot.mouseClick(tab.capture_button, Qt.MouseButton.LeftButton)
    _wait(qtbot, tab, 1)
    maps = tab.result.maps[1]
    records = window.sessions.store.list_inspections(window.sessions.session.id, kind="attention")
    assert len(records) == 1 and tab.earlier_list.count() == 1
    close_window(qtbot, window)

    again = make_window()
    wait_ready(qtbot, again)
    tab = again.inspect.attention
    qtbot.waitUntil(lambda: tab.earlier_list.count() == 1, timeout=20000)  # the reopened session's results
    tab.reload(0)
    assert tab.result.layers == [1]
    np.testing.assert_allclose(tab.heatmap.image_data(), maps.mean(axis=0), atol=1e-6)


def test_heatmap_view_nan_cells_grey_and_thinned_labels(qtbot):
    from app.plots import NAN_GREY, HeatmapView

    view = HeatmapView()
    qtbot.addWidget(view)
    view.resize(600, 500)
    view.show()
    qtbot.waitExposed(view)
    data = np.arange(12, dtype=float).reshape(3, 4)
    data[1, 2] = np.nan
    view.set_data(data, ["a", "b", "c"], ["w", "x", "y", "z"], title="t")
    assert view.levels == (0.0, 11.0)  # the finite min and max
    picture = view.plot.grab().toImage()

    def colour(row, col):
        return picture.pixelColor(view.plot.mapFromScene(view.scene_pos_of(row, col))).getRgb()

    assert colour(1, 2) == NAN_GREY
    assert colour(0, 0) != NAN_GREY and colour(0, 0) != colour(2, 3)  # the colour map's two ends
    # 120 labels: thinned to every k-th, starting at the first, never more than fit.
    labels = [f"t{i}" for i in range(120)]
    view.set_data(np.zeros((120, 120)), labels, labels)
    left = view.ticks("left")
    assert 1 < len(left) < 120 and left[0] == (0.5, "t0")
    step = round(left[1][0] - left[0][0])
    assert all(label == f"t{int(pos - 0.5)}" and int(pos - 0.5) % step == 0 for pos, label in left)
    assert view.levels == (-0.5, 0.5)  # a constant matrix still gets a colour range


def test_the_window_builds_the_inspect_tab_when_it_is_first_shown(qtbot, make_window):
    """Its plots need pyqtgraph and numpy: built at start-up they cost about a second and 60 MB."""
    from app.inspect_panel import InspectPanel

    window = make_window()
    host = window._inspect_host
    assert not host.built
    window.workspace.setCurrentWidget(host)
    qtbot.waitUntil(lambda: host.built, timeout=5000)
    assert isinstance(window.inspect, InspectPanel) and window.inspect.parent() is host
