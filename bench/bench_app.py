"""Benchmark of the desktop app: start-up time, GUI-thread stalls during a merge, idle memory.

    python bench/bench_app.py [--runs 5] [--merges 3] [--json]

* Start-up: ``mergestudio`` (the real console script) is launched ``--runs`` times
  after one warm-up launch; the window reports when it was first painted
  (``MERGESTUDIO_STARTUP_PROBE``). Time from launch to first paint, median.
* Idle memory: the same launches report their resident memory after 5 idle seconds
  (library scanned, sessions database open, no model loaded), median.
* Stalls: in this process, a real window merges a Llama-style model family
  (3 bf16 models of ~170 MB, 12 layers, TIES) ``--merges`` times while a 10 ms heartbeat timer runs on the
  GUI thread; the longest gap between two heartbeats, minus the 10 ms period, is the
  worst stall. The merge itself runs in a child process, as in the app.

Uses the X display in $DISPLAY when there is one (run under Xvfb for a real window),
else Qt's offscreen platform. Targets (issue 4): window within 1.5 s, no stall over 50 ms,
idle under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _platform_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, MERGESTUDIO_HOME=str(home))
    if not env.get("DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    else:
        env.pop("QT_QPA_PLATFORM", None)
    return env


def measure_startup(runs: int, home: Path, idle_s: float = 5.0) -> dict:
    script = Path(sys.executable).parent / "mergestudio"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.launcher"]
    results = []
    for i in range(runs + 1):  # the first launch warms the disk cache and creates the database
        probe = home / f"probe-{i}.json"
        env = _platform_env(home)
        env["MERGESTUDIO_STARTUP_PROBE"] = str(probe)
        env["MERGESTUDIO_PROBE_IDLE_S"] = str(idle_s)
        started = time.time()
        proc = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
        if not probe.exists():
            raise SystemExit(f"the app did not report (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        data = json.loads(probe.read_text())
        if i == 0:
            continue
        results.append({"startup_s": data["shown_at"] - started, "rss_bytes": data["rss_bytes"],
                        "torch_loaded": data["torch_loaded"]})
    return {
        "runs": results,
        "startup_median_s": statistics.median(r["startup_s"] for r in results),
        "idle_rss_median_bytes": statistics.median(r["rss_bytes"] for r in results),
        "torch_loaded": any(r["torch_loaded"] for r in results),
    }


def measure_stalls(merges: int, home: Path, models: Path) -> dict:
    os.environ.update(_platform_env(home))
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from app.window import MainWindow

    window = MainWindow()
    window.show()
    _wait(app, lambda: window.sessions.session is not None, 30)
    _wait(app, lambda: window.library_panel.scans >= 1, 30)
    window.library_panel.add_folder(models)
    _wait(app, lambda: len(window.library.models) >= 3, 60)
    base, a, b = (str(models / n) for n in ("bench-llama-base", "bench-llama-a", "bench-llama-b"))
    window.doc.set_method("ties")
    window.doc.add_model(base, "bench-llama-base", as_base=True)
    for ref in (a, b):
        index = window.doc.add_model(ref, Path(ref).name)
        window.doc.set_param("weight", 0.5, index)
        window.doc.set_param("density", 0.5, index)
    results = []
    for i in range(merges):
        out = home / f"merged-{i}"
        window.doc.set_export(output=str(out), overwrite=True)
        window.editor.run_preflight()
        _wait(app, lambda: window.editor.preflight_idle() and window.editor.last_report is not None, 60)
        if not window.editor.last_report.ok:
            raise SystemExit(f"preflight failed: {window.editor.last_report.problem}")
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        done: list = []
        window.mergeFinished.connect(lambda job: done.append(job))
        timer.start()
        started = time.perf_counter()
        job = window.start_merge()
        _wait(app, lambda: bool(done), 600)
        timer.stop()
        window.mergeFinished.disconnect()
        if job is None or job.status != "succeeded":
            raise SystemExit(f"the merge failed: {getattr(job, 'error', None)}")
        gaps = [(t1 - t0) * 1000 - 10 for t0, t1 in zip(ticks, ticks[1:])]
        first_gap = (ticks[0] - started) * 1000 if ticks else 0.0
        results.append({
            "merge_s": time.perf_counter() - started,
            "ticks": len(ticks),
            "worst_stall_ms": max([first_gap - 10, *gaps]) if gaps else None,
            "p99_stall_ms": sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else None,
            "stalls_over_50ms": sum(g > 50 for g in gaps),
        })
    window.confirm_quit = False
    window.close()
    return {"merges": results, "worst_stall_ms": max(r["worst_stall_ms"] for r in results),
            "median_worst_stall_ms": statistics.median(r["worst_stall_ms"] for r in results)}


def _wait(app, condition, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting for the window")
        app.processEvents()
        time.sleep(0.005)


def build_models(root: Path) -> Path:
    from tests.fixtures.tiny_models import make_family

    folder = root / "bench-models"
    if not (folder / "bench-llama-b").exists():
        import torch

        family = make_family(folder / "tmp", arch="llama", n_variants=2, num_layers=12, hidden=768,
                             intermediate=2048, heads=12, kv_heads=4, dtype=torch.bfloat16)
        for key, path in family.items():
            path.rename(folder / f"bench-llama-{key}")
        (folder / "tmp").rmdir()
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--merges", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergestudio-bench-app-") as tmp:
        tmp_path = Path(tmp)
        models = build_models(tmp_path)
        startup = measure_startup(args.runs, tmp_path / "home-startup")
        stalls = measure_stalls(args.merges, tmp_path / "home-stalls", models)
    platform = "xcb (X display)" if os.environ.get("DISPLAY") else "offscreen"
    result = {"platform": platform, "startup": startup, "stalls": stalls}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Qt platform: {platform}")
    each = ", ".join(f"{r['startup_s']:.2f}" for r in startup["runs"])
    print(f"Start-up to first paint: median {startup['startup_median_s']:.2f} s over {args.runs} warm launches "
          f"({each}); target 1.5 s")
    print(f"Idle resident memory after 5 s: median {startup['idle_rss_median_bytes'] / 1e6:.0f} MB; target 300 MB; "
          f"torch loaded in the window process: {startup['torch_loaded']}")
    for i, r in enumerate(stalls["merges"]):
        print(f"Merge {i + 1}: {r['merge_s']:.1f} s, {r['ticks']} heartbeats, worst stall {r['worst_stall_ms']:.1f} ms, "
              f"p99 {r['p99_stall_ms']:.1f} ms, {r['stalls_over_50ms']} over 50 ms")
    print(f"Worst GUI-thread stall during merges: {stalls['worst_stall_ms']:.1f} ms (median of the per-merge worst: "
          f"{stalls['median_worst_stall_ms']:.1f} ms); target 50 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
