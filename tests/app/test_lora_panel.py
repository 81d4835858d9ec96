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
