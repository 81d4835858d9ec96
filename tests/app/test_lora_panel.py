"""The LoRA tab: extract a LoRA from two models, merge it back, combine; failures are messages, outputs join the library."""

from __future__ import annotations

import json

from tests.app.conftest import wait_ready


def _run(qtbot, window, start) -> object:
    with qtbot.waitSignal(window.jobs.jobEnded, timeout=120000) as ended:
        start()
    return ended.args[0]


def test_extract_merge_and_combine_loras(qtbot, make_window, llama_family, gpt2_family, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    panel = window.lora
    window.workspace.setCurrentWidget(panel)

    panel.extract_base.set_path(str(llama_family["base"]))
    panel.extract_tuned.set_path(str(llama_family["a"]))
    panel.extract_rank.setValue(4)
    adapter = tmp_path / "adapter"
    panel.extract_output.setText(str(adapter))
    job = _run(qtbot, window, panel.extract_button.click)
    assert job.status == "succeeded", job.error
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4

    panel.merge_model.set_path(str(llama_family["base"]))
    panel.merge_loras.add(str(adapter), 0.5)
    merged = tmp_path / "merged"
    panel.merge_output.setText(str(merged))
    job = _run(qtbot, window, panel.merge_button.click)
    assert job.status == "succeeded", job.error
    assert (merged / "model.safetensors").is_file()
    assert window.library.get(merged) is not None  # the output joined the library

    panel.combine_loras.add(str(adapter), 1.0)
    panel.combine_loras.add(str(adapter), 0.5)
    combined = tmp_path / "combined"
    panel.combine_output.setText(str(combined))
    job = _run(qtbot, window, panel.combine_button.click)
    assert job.status == "succeeded", job.error
    assert json.loads((combined / "adapter_config.json").read_text())["r"] == 8  # linear: the ranks concatenated

    # A LoRA for another model: one sentence in the window, nothing written.
    panel.merge_model.set_path(str(gpt2_family["base"]))
    wrong = tmp_path / "wrong"
    panel.merge_output.setText(str(wrong))
    job = _run(qtbot, window, panel.merge_button.click)
    assert job.status == "failed" and "\n" not in job.error
    assert "failed" in window.notice.text()
    assert not wrong.exists()


class _Library:
    """What LoraPanel's model pickers read: a models list and a models_changed signal."""

    def __init__(self) -> None:
        from PySide6.QtCore import QObject, Signal

        class Events(QObject):
            models_changed = Signal()

        self.events = Events()
        self.models: list = []


def test_combine_rank_zero_only_means_exact_for_linear(qtbot, tmp_path):
    from app.lora_panel import LoraPanel
    from core.jobs import drive
    from core.lora import open_lora
    from tests.core.test_lora_sd import kohya_lora

    library = _Library()
    panel = LoraPanel(library)
    qtbot.addWidget(panel)
    spin = panel.combine_rank
    modules = {"lora_unet_down_blocks_0_attentions_0_proj_in": (2, 8, (8,))}
    first = kohya_lora(tmp_path / "one.safetensors", modules, seed=1)
    second = kohya_lora(tmp_path / "two.safetensors", modules, seed=2)
    panel.combine_loras.add(str(first), 1.0)
    panel.combine_loras.add(str(second), 0.5)
    emitted = []
    panel.jobRequested.connect(lambda title, fn, kwargs: emitted.append((fn, kwargs)))

    assert panel.combine_method.currentText() == "linear"
    assert spin.value() == 0 and spin.text() == "exact (ranks concatenated)"
    assert not panel.combine_density.isEnabled()

    panel.combine_method.setCurrentText("ties")
    assert spin.minimum() == 1 and spin.value() >= 1 and spin.specialValueText() == ""
    assert "exact" not in spin.text() and panel.combine_density.isEnabled()
    spin.setValue(0)  # not possible any more: clamped to rank 1
    assert spin.value() == 1
    spin.setValue(3)
    panel.combine_method.setCurrentText("dare_ties")
    assert spin.value() == 3  # the rank carries over between the SVD methods
    panel.combine_method.setCurrentText("ties")
    panel.combine_output.setText(str(tmp_path / "ties.safetensors"))
    panel.start_combine()
    fn, kwargs = emitted[-1]
    assert kwargs["method"] == "ties" and kwargs["rank"] == 3
    result = drive(fn(**kwargs))  # the engine accepts what the panel sends (no refusal naming CLI flags)
    lora = open_lora(result.output)
    assert {m.rank for m in lora.modules.values()} == {3}  # refactored to the rank the panel shows
    lora.close()

    panel.combine_method.setCurrentText("linear")
    assert spin.value() == 0 and spin.text() == "exact (ranks concatenated)"
    panel.combine_output.setText(str(tmp_path / "linear.safetensors"))
    panel.start_combine()
    fn, kwargs = emitted[-1]
    assert "rank" not in kwargs and "density" not in kwargs
    assert drive(fn(**kwargs)).exact
