"""Review of the Tokens panel (issue 7): each test pins down a defect that was found and fixed.

Float bounds the value box cannot hold (an endless re-measure, illegal sweeps), a
run recorded in the session that was current when it ended, work started after the
window closed, ranges of a superseded measurement clamping newer values, stale
ranges clamping a new model's defaults, PiToMe's margin sent as 0.0, runs the
panel cannot set up restored as something else, a stale diffusion block index,
the step box's arrows, CLIP folders, a cancelled image dialog, choice options read
as ranges, and images left behind by a failed save.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from tests.app.conftest import close_window, wait_ready  # noqa: E402

LONG = "the cat sat on the mat and the dog sat on the log while a bird sang in the old tree"
SHORT = "short one here"


@pytest.fixture(scope="session")
def review_models(tmp_path_factory) -> Path:
    """A library folder: a ViT (64 px, 8 px patches: 65 tokens), a BERT, a small UNet and a CLIP model."""
    import torch
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from core.tokens import tiny

    root = tmp_path_factory.mktemp("review-token-models")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64)).eval().save_pretrained(root / "tiny-vit")  # fmt: skip
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).eval().save_pretrained(root / "tiny-bert")
    tiny.build("unet", size="small").model.save_pretrained(root / "tiny-unet")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    clip = CLIPConfig(text_config=dict(vocab_size=100, max_position_embeddings=16, **small),
                      vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)  # fmt: skip
    CLIPModel(clip).eval().save_pretrained(root / "tiny-clip")
    return root


@pytest.fixture
def small_latents(monkeypatch):
    """UNets measured on 64 px (8x8 latents) instead of 512 px: the same code, a fraction of the time."""
    from core.tokens import lab

    monkeypatch.setattr(lab, "DEFAULT_RESOLUTION", 64)


def _panel(qtbot, window, folder: Path, model: str):
    assert window.library_panel.add_folder(folder)
    qtbot.waitUntil(lambda: window.library.get(folder / model) is not None, timeout=20000)
    panel = window.tokens
    window.workspace.setCurrentWidget(panel)
    assert panel.select_model(str(folder / model))
    return panel


def _measured(qtbot, panel, count: int, timeout: int = 60000) -> None:
    qtbot.waitUntil(lambda: panel.measurements >= count and panel.idle(), timeout=timeout)


def _next(qtbot, panel, timeout: int = 60000) -> None:
    """Wait for the measurement that the last change asked for."""
    done = panel.measurements
    qtbot.waitUntil(lambda: panel.measurements > done and panel.idle(), timeout=timeout)


def _count_adjusts(panel) -> list:
    """Record every "adjust" answer of the worker (the panel moving a value into its legal range)."""
    seen: list = []
    original = panel._returned

    def counting(payload):
        if payload[0] == "adjust":
            seen.append(payload[2])
        original(payload)

    panel._returned = counting  # workers connect to the attribute when they start
    return seen


# -- float bounds the value box can hold ---------------------------------------------------
def test_a_float_row_never_holds_a_value_beyond_its_bounds(qtbot):
    """A 3-decimal box rounds 2/3 up to 0.667, which the engine refuses (and the panel re-measures forever)."""
    from app.tokens_panel import _beyond, _OptionRow

    row = _OptionRow({"name": "ratio", "type": "float", "default": 0.5, "range": [0.0, 0.75], "choices": None,
                      "exclusive": []})  # fmt: skip
    qtbot.addWidget(row)
    for low, high in ((0.0, 2 / 3), (1 / 3, 8 / 9)):
        row.set_bounds((low, high))
        row.slider.setValue(row.slider.maximum())
        assert low <= row.value() <= high
        row.set_value(high)
        assert low <= row.value() <= high and not _beyond({"ratio": row.value()}, {"ratio": (low, high)})
        row.slider.setValue(row.slider.minimum())
        assert low <= row.value() <= high
        row.set_value(low)
        assert low <= row.value() <= high


def test_unet_ratio_at_the_top_of_a_thirds_range_is_measured_once_and_sweeps_stay_legal(
    qtbot, make_window, review_models, small_latents
):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-unet")
    _measured(qtbot, panel, 1)
    adjusts = _count_adjusts(panel)
    panel.set_option("sx", 1)
    panel.set_option("sy", 3)
    _next(qtbot, panel)
    high = panel.ranges["ratio"][1]
    assert high == pytest.approx(2 / 3)
    row = panel.option_row("ratio")
    row.slider.setValue(row.slider.maximum())
    qtbot.waitUntil(lambda: (panel.idle() and panel.last_result.options["ratio"] > 0.5) or len(adjusts) > 3,
                    timeout=60000)  # fmt: skip
    assert len(adjusts) <= 1, f"the panel re-measured {len(adjusts)} times"
    assert 0.5 < panel.last_result.options["ratio"] <= high
    name, values = panel.sweep_values()
    assert name == "ratio" and max(values) <= high and len(set(values)) == len(values)
    # sx = sy = 1: every token is a destination, the only legal ratio is 0; a sweep measures it once.
    panel.set_option("sx", 1)
    panel.set_option("sy", 1)
    qtbot.waitUntil(lambda: panel.idle() and panel.last_result.options.get("sy") == 1, timeout=60000)
    assert panel.ranges["ratio"] == (0.0, 0.0)
    name, values = panel.sweep_values()
    assert values == [0.0]


# -- the session a run belongs to ----------------------------------------------------------
def test_a_run_is_recorded_in_the_session_it_was_measured_in(qtbot, make_window, review_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    first = window.sessions.session.id
    store = window.sessions.store
    before = len(store.list_token_runs(first))
    panel.set_option("r", 3)
    panel.measure_now()  # the worker runs now...
    second = window.new_session("another").id  # ...and the person opens another session meanwhile
    qtbot.waitUntil(lambda: panel.idle() and panel.last_result.options["r"] == 3, timeout=60000)
    runs = store.list_token_runs(first)
    assert len(runs) == before + 1 and runs[0].options["r"] == 3
    assert runs[0].images and Path(runs[0].images[0]).parent == store.token_views_dir(first)
    assert store.list_token_runs(second) == []


def test_a_failed_save_leaves_no_view_image(qtbot, make_window, review_models, monkeypatch):
    from core.sessions import StoreError

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    store = window.sessions.store
    folder = store.token_views_dir(window.sessions.session.id)
    kept = sorted(folder.iterdir())

    def refuse(*args, **kwargs):
        raise StoreError("The sessions database is full.")

    monkeypatch.setattr(store, "add_token_run", refuse)
    problems: list = []
    panel.problem.connect(problems.append)
    panel.set_option("r", 4)
    _next(qtbot, panel)
    assert problems and "not saved" in problems[-1]
    assert sorted(folder.iterdir()) == kept  # no image of a run that is not in the session


# -- closing the window ---------------------------------------------------------------------
def test_closing_while_a_newer_setting_waits_starts_no_more_work(qtbot, make_window, review_models):
    """A thread started after the window closed is still running when the app exits: the process aborts."""
    from PySide6.QtCore import QCoreApplication

    from app.workers import running_workers

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    panel.set_option("r", 3)
    panel.measure_now()
    panel.set_option("r", 4)
    panel.measure_now()  # r = 4 waits for r = 3 to stop
    panel.set_option("r", 5)  # and r = 5 waits for its debounce
    worker = panel._worker
    close_window(qtbot, window)
    assert worker._thread is None or worker._thread.isFinished()  # the window waited for it
    QCoreApplication.sendPostedEvents()  # its last reports reach the panel...
    QCoreApplication.processEvents()
    assert not running_workers(), "the panel started a measurement after the window closed"
    assert not panel._timer.isActive()


# -- ranges of superseded work ---------------------------------------------------------------
def test_ranges_of_a_superseded_measurement_do_not_clamp_newer_values(qtbot, make_window, review_models, monkeypatch):
    from core.tokens import lab

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-bert")
    panel.text_edit.setText(LONG)
    panel.request_update(immediate=True)
    qtbot.waitUntil(lambda: panel.idle() and panel.last_request.text == LONG, timeout=60000)
    long_top = panel.ranges["r"][1]
    assert long_top >= 5
    entered, release = threading.Event(), threading.Event()
    real = lab.legal_ranges

    def gated(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(lab, "legal_ranges", gated)
    panel.text_edit.setText(SHORT)  # r can be at most 1 for this sentence...
    panel.measure_now()
    qtbot.waitUntil(entered.is_set, timeout=20000)
    monkeypatch.setattr(lab, "legal_ranges", real)
    panel.text_edit.setText(LONG)  # ...but the person went back to the long one and chose r = 5
    panel.set_option("r", 5)
    panel.measure_now()
    release.set()
    qtbot.waitUntil(lambda: panel.idle() and panel.last_request.text == LONG, timeout=60000)
    assert panel.last_result.options["r"] == 5
    assert panel.option_row("r").value() == 5


def test_a_new_models_defaults_are_not_clamped_by_the_last_models_ranges(qtbot, make_window, review_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-bert")
    _measured(qtbot, panel, 1)
    assert panel.ranges["r"][1] < 8  # the sample sentence is short: BERT's default r = 8 was moved down
    assert panel.select_model(str(review_models / "tiny-vit"))
    qtbot.waitUntil(lambda: panel.idle() and panel.last_request.model_path.name == "tiny-vit", timeout=60000)
    assert panel.ranges["r"][1] >= 8
    assert panel.last_result.options["r"] == 8  # the schema's default, legal for this ViT
    panel.select_method("pitome")
    qtbot.waitUntil(lambda: panel.idle() and panel.last_result.method == "pitome", timeout=60000)
    assert panel.last_result.options["r"] == 8


# -- what is sent -------------------------------------------------------------------------------
def test_pitome_keeps_the_papers_margin_schedule_unless_a_margin_is_chosen(qtbot, make_window, review_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    panel.select_method("pitome")
    assert "margin" not in panel.options()
    assert "margin" not in panel.python_line()
    qtbot.waitUntil(lambda: panel.idle() and panel.last_result.method == "pitome", timeout=60000)
    assert "margin" not in panel.last_result.options
    panel.set_option("margin", 0.5)
    _next(qtbot, panel)
    assert panel.last_result.options["margin"] == 0.5 and "margin=0.5" in panel.python_line()
    panel.set_option("margin", None)
    _next(qtbot, panel)
    assert "margin" not in panel.last_result.options


# -- restoring runs ------------------------------------------------------------------------------
def test_a_run_the_panel_cannot_set_up_is_refused_not_replaced(qtbot, make_window, review_models):
    """JSON gives an (r, inflection) pair back as a list; the r box holds one whole number."""
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    store, session = window.sessions.store, window.sessions.session
    path = str(review_models / "tiny-vit")
    store.add_token_run(session.id, model_path=path, model_name="tiny-vit", method="tome",
                        options={"r": (4, -0.5)}, figures={})  # fmt: skip
    panel.refresh_runs()
    assert panel.token_runs[0].options["r"] == [4, -0.5]
    done, shown = panel.measurements, panel.option_row("r").value()
    panel.restore_run(0)
    assert panel.error_label.isVisible() and "r" in panel.error_label.text()
    assert "[4, -0.5]" in panel.error_label.text()
    assert panel.idle() and panel.measurements == done and panel.option_row("r").value() == shown
    store.add_token_run(session.id, model_path=path, model_name="tiny-vit", method="tome",
                        options={"r": 2, "speed": 3}, figures={})  # fmt: skip
    panel.refresh_runs()
    panel.restore_run(0)
    assert "speed" in panel.error_label.text() and panel.measurements == done
    store.add_token_run(session.id, model_path=path, model_name="tiny-vit", method="tomesd",
                        options={"ratio": 0.5}, figures={})  # fmt: skip
    panel.refresh_runs()
    panel.restore_run(0)
    assert "tomesd" in panel.error_label.text() and panel.method_combo.currentData() == "tome"
    assert panel.idle() and panel.measurements == done


# -- diffusion: block and step -------------------------------------------------------------------
def test_the_chosen_block_survives_a_setting_with_fewer_blocks(qtbot, make_window, review_models, small_latents):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-unet")
    _measured(qtbot, panel, 1)
    panel.set_option("max_downsample", 2)
    _next(qtbot, panel)
    assert panel.last_result.layer_labels == ["down.0.attn.0", "mid.attn.0", "up.1.attn.0", "up.1.attn.1"]
    panel.block_combo.setCurrentIndex(3)
    panel.block_combo.activated.emit(3)
    _next(qtbot, panel)
    assert panel.last_result.groups.labels == ["up.1.attn.1"]
    done, errors = panel.measurements, panel.errors
    panel.set_option("max_downsample", 1)  # three blocks: index 3 does not exist any more
    qtbot.waitUntil(lambda: panel.idle() and (panel.measurements > done or panel.errors > errors), timeout=60000)
    assert panel.errors == errors, panel.error_label.text()
    assert panel.last_result.layer_labels == ["down.0.attn.0", "up.1.attn.0", "up.1.attn.1"]
    assert panel.last_result.groups.labels == ["up.1.attn.1"]  # the same block, by name
    assert panel.block_combo.currentText() == "up.1.attn.1"
    assert [panel.block_combo.itemText(i) for i in range(panel.block_combo.count())] == panel.last_result.layer_labels
    panel.keep_button.click()
    card_text = " ".join(label.text() for label in panel.variants_area.widget().findChildren(type(panel.layer_label)))
    assert "None" not in card_text  # a UNet has no "tokens out"


def test_the_step_boxs_arrows_measure_the_new_step(qtbot, make_window, review_models, small_latents):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-unet")
    _measured(qtbot, panel, 1)
    done = panel.measurements
    panel.step_spin.stepUp()  # an arrow click: valueChanged, no editingFinished
    assert not panel.idle(), "the new step was never measured"
    qtbot.waitUntil(lambda: panel.measurements > done and panel.idle(), timeout=60000)
    assert panel.last_request.timestep == 501


# -- models and inputs ---------------------------------------------------------------------------
def test_a_clip_folder_is_a_vision_model_with_image_inputs(qtbot, make_window, review_models):
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-clip")
    index = panel.model_combo.findData(str(review_models / "tiny-clip"))
    assert "not a supported kind" not in panel.model_combo.itemText(index)
    assert panel.input_combo.itemText(0).startswith("Sample:")
    _measured(qtbot, panel, 1)
    assert panel.last_result.groups.kind == "image"


def test_a_cancelled_image_dialog_keeps_the_input(qtbot, make_window, review_models, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from app.tokens_panel import DISK_IMAGE

    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-vit")
    _measured(qtbot, panel, 1)
    panel.input_combo.setCurrentIndex(1)
    panel.input_combo.activated.emit(1)
    _next(qtbot, panel)
    chart = panel.input_combo.itemData(1)
    assert panel.last_request.image == Path(chart)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: ("", "")))
    disk = panel.input_combo.findText(DISK_IMAGE)
    panel.input_combo.setCurrentIndex(disk)
    panel.input_combo.activated.emit(disk)
    assert panel.input_combo.currentData() == chart
    panel.set_option("r", 3)
    _next(qtbot, panel)
    assert panel.last_request.image == Path(chart)


def test_a_choice_is_not_read_as_a_range(qtbot, make_window, review_models, small_latents):
    """The small UNet's transformer blocks sit at downsample 1 and 2: (1, 2) is a list of choices."""
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-unet")
    _measured(qtbot, panel, 1)
    assert panel.ranges["max_downsample"] == (1, 2)
    adjusts = _count_adjusts(panel)
    panel.set_option("max_downsample", 4)  # the engine takes it: every block up to downsample 4
    _next(qtbot, panel)
    assert adjusts == [] and panel.last_result.options["max_downsample"] == 4


def test_a_value_of_the_other_mode_moved_by_new_ranges_is_reported(qtbot, make_window, review_models):
    """Measuring by threshold, r's box is still bounded by the input's legal r: Qt moves its value silently."""
    window = make_window()
    wait_ready(qtbot, window)
    panel = _panel(qtbot, window, review_models, "tiny-bert")
    panel.text_edit.setText(LONG)
    panel.request_update(immediate=True)
    qtbot.waitUntil(lambda: panel.idle() and panel.last_request.text == LONG, timeout=60000)
    panel.set_option("r", 5)
    _next(qtbot, panel)
    panel.set_option("threshold", 0.5)
    _next(qtbot, panel)
    panel.text_edit.setText(SHORT)
    panel.request_update(immediate=True)
    qtbot.waitUntil(lambda: panel.idle() and panel.last_request.text == SHORT, timeout=60000)
    assert panel.option_row("r").value() == panel.ranges["r"][1] < 5
    assert "r = 5 is beyond" in panel.status_label.text()
