"""The Compare tab on tiny local models: two causal LMs (and a model against itself), streamed panes,
figures, Stop, a failing pane beside a working one, images with a difference pane, results kept in the session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.app.conftest import wait_ready


@pytest.fixture(scope="session")
def compare_models(llama_family, tmp_path_factory) -> Path:
    """A library folder: llama base and a (a fine-tune-like variant), a copy of base, and a folder without a tokenizer."""
    root = tmp_path_factory.mktemp("compare-models")
    for key in ("base", "a"):
        shutil.copytree(llama_family[key], root / f"llama-{key}")
    shutil.copytree(llama_family["base"], root / "llama-copy")
    from tests.fixtures.tiny_models import make_base

    make_base(root / "gpt2-base", arch="gpt2", vocab=300)  # another vocabulary than llama's
    long = shutil.copytree(llama_family["base"], root / "llama-long")  # rotary: more positions need no weights
    config = json.loads((long / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (long / "config.json").write_text(json.dumps(config))
    broken = shutil.copytree(llama_family["b"], root / "llama-notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (broken / name).unlink(missing_ok=True)
    return root


@pytest.fixture(scope="session")
def compare_pipelines(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_pipelines import make_generation_pipeline

    root = tmp_path_factory.mktemp("compare-pipes")
    make_generation_pipeline(root / "pipe-a", seed=0)
    make_generation_pipeline(root / "pipe-b", seed=1)
    return root


def _ready(qtbot, make_window, folder: Path):
    window = make_window()
    wait_ready(qtbot, window)
    assert window.library_panel.add_folder(folder)
    qtbot.waitUntil(lambda: all(window.library.get(p) is not None for p in folder.iterdir()), timeout=30000)
    panel = window.compare
    window.workspace.setCurrentWidget(panel)
    return window, panel


def _run(qtbot, panel, timeout: int = 90000) -> None:
    panel.run()
    qtbot.waitUntil(lambda: not panel.is_running() and panel.run_button.isEnabled(), timeout=timeout)


def test_two_models_stream_into_their_panes_and_the_run_is_kept(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-base"), str(compare_models / "llama-a")])
    panel.prompt_edit.setPlainText("hello world")
    panel.tokens_spin.setValue(8)
    panel.top_k_spin.setValue(5)
    panel.penalty_spin.setValue(1.2)
    streamed = []
    panel.panes[0].text.textChanged.connect(lambda: streamed.append(panel.panes[0].text.toPlainText()))
    _run(qtbot, panel)
    assert [r.status for r in panel.results] == ["done", "done"]
    for pane, result in zip(panel.panes, panel.results):
        assert pane.text.toPlainText() == "hello world" + result.text
        assert "tokens/s" in pane.figures.text() and "first token" in pane.figures.text()
    assert len(streamed) >= 3  # the text grew token by token, not at once
    (record,) = window.sessions.store.list_inspections(window.sessions.session.id, kind="compare-text")
    assert record.status == "done" and record.models == [str(compare_models / "llama-base"),
                                                         str(compare_models / "llama-a")]
    assert [p["text"] for p in record.results["panes"]] == [r.text for r in panel.results]
    assert record.settings["top_k"] == 5 and record.settings["repetition_penalty"] == 1.2
    assert panel.earlier_list.count() == 1
    # Shown again from the session.
    panel.panes[0].text.clear()
    panel.show_earlier(0)
    assert panel.panes[0].text.toPlainText() == "hello world" + panel.results[0].text


def test_identical_models_give_identical_panes(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-base"), str(compare_models / "llama-copy")])
    panel.prompt_edit.setPlainText("the cat")
    panel.tokens_spin.setValue(6)
    _run(qtbot, panel)
    a, b = panel.results
    assert a.status == b.status == "done" and a.text == b.text
    assert panel.panes[0].text.toPlainText() == panel.panes[1].text.toPlainText()


def test_a_pane_without_tokenizer_fails_alone(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-notok"), str(compare_models / "llama-base")])
    panel.prompt_edit.setPlainText("hello")
    panel.tokens_spin.setValue(4)
    _run(qtbot, panel)
    bad, good = panel.results
    assert bad.status == "failed" and "llama-notok" in bad.error
    assert good.status == "done" and good.new_tokens > 0
    assert "failed" in panel.panes[0].figures.text()
    (record,) = window.sessions.store.list_inspections(window.sessions.session.id, kind="compare-text")
    assert record.status == "partial"


def test_stop_ends_the_run_with_what_was_generated(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-long"), str(compare_models / "llama-a")])
    panel.prompt_edit.setPlainText("hello")
    panel.tokens_spin.setValue(8000)  # far more than the test waits for
    panel.run()
    qtbot.waitUntil(lambda: len(panel.panes[0].text.toPlainText()) > len("hello") + 3, timeout=60000)
    panel.stop_run()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=60000)
    assert panel.results and panel.results[0].status == "stopped"
    assert 0 < panel.results[0].new_tokens < 8000
    assert panel.panes[0].text.toPlainText() == "hello" + panel.results[0].text
    assert panel.run_button.isEnabled()


def test_fewer_than_two_models_is_a_message(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-base")])
    panel.prompt_edit.setPlainText("hello")
    panel.run()
    assert not panel.is_running() and "at least two" in panel.status_label.text()


def test_images_side_by_side_with_token_merging_and_a_difference(qtbot, make_window, compare_pipelines):
    window, panel = _ready(qtbot, make_window, compare_pipelines)
    panel.mode_combo.setCurrentIndex(panel.mode_combo.findData("image"))
    panel.select_sources([str(compare_pipelines / "pipe-a"), str(compare_pipelines / "pipe-b")])
    panel.prompt_edit.setPlainText("a photo of a cat")
    panel.steps_spin.setValue(2)
    panel.width_spin.setValue(64)
    panel.height_spin.setValue(64)
    panel.tome_check.setChecked(True)
    _run(qtbot, panel, timeout=120000)
    assert [r.status for r in panel.results] == ["done"] * 3
    assert panel.results[2].token_merging and panel.results[2].token_merging["method"] == "tomesd"
    assert panel.panes[0].pixmap is not None and panel.panes[0].pixmap.width() == 64
    # The difference shown is token merging on/off: the variant against its own pipeline.
    assert "ToMe" in panel.diff_pane.title.text() and "pipe-a" in panel.diff_pane.title.text()
    assert panel.difference_stats is not None and panel.difference_stats["mean_abs"] > 0
    (record,) = window.sessions.store.list_inspections(window.sessions.session.id, kind="compare-image")
    assert len(record.files) == 3 and all(Path(f).is_file() for f in record.files)
    assert len({Path(f).parent for f in record.files}) == 1  # one folder per run: runs never overwrite
    assert record.settings["device"] == "auto"


def test_closing_during_a_run_keeps_the_panes_that_finished(qtbot, make_window, compare_models, fresh_home):
    from core.sessions import SessionStore

    window, panel = _ready(qtbot, make_window, compare_models)
    session_id = window.sessions.session.id
    panel.select_sources([str(compare_models / "llama-base"), str(compare_models / "llama-long")])
    panel.prompt_edit.setPlainText("hello")
    panel.tokens_spin.setValue(120)
    panel.run()
    qtbot.waitUntil(lambda: len(panel.results) == 1, timeout=60000)  # the first pane is done
    first = panel.results[0]
    window.confirm_quit = False
    window.close()  # the second pane is loading or generating
    assert not panel.is_running()
    store = SessionStore.open(fresh_home / "sessions.db")
    try:
        (record,) = store.list_inspections(session_id, kind="compare-text")
    finally:
        store.close()
    assert record.results["panes"][0]["status"] == "done"
    assert record.results["panes"][0]["text"] == first.text


def test_different_tokenizers_are_said_in_the_panes(qtbot, make_window, compare_models):
    window, panel = _ready(qtbot, make_window, compare_models)
    panel.select_sources([str(compare_models / "llama-base"), str(compare_models / "gpt2-base")])
    panel.prompt_edit.setPlainText("hello world")
    panel.tokens_spin.setValue(4)
    _run(qtbot, panel)
    assert [r.status for r in panel.results] == ["done", "done"]
    for pane in panel.panes[:2]:
        assert "different tokenizers" in pane.figures.text()
