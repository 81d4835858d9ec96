"""Benchmark: `mergestudio merge` against the A1111 approach on SD-1.5-sized checkpoints.

Builds three synthetic SD 1.5 checkpoints A, B, C (fp16 single files under the
real key names, full widths: UNet ch 320, CLIP-L 768 x 12, VAE ch 128; about
1.07 B parameters, 2.1 GB each) in a temporary folder, then for two recipes with
block weights

* ``weighted_sum``: A·(1 − alpha) + B·alpha, alpha a V shape over the 26 blocks;
* ``add_difference``: A + multiplier·(B − C), multiplier per block around 1.0;

runs `mergestudio merge RECIPE -o OUT.safetensors` and the A1111 approach (a
small script written into the temporary folder: load every state dict whole
with ``safetensors.torch.load_file``, merge key by key in memory with the same
formula and the same per-key block values from ``core.merge.blocks``, save
with ``safetensors.torch.save_file``) as child processes, alternating, after
one warm-up pair. It prints the medians of wall time and peak RSS, their
ratios (ours / A1111's), the I/O floor (reading the inputs once and writing
one output, with fsync) and the largest difference between the two outputs.
Everything is removed at the end.

    python bench/bench_sd.py [--runs 3] [--recipes weighted_sum add_difference] [--json] [--tmpdir DIR]

Targets (issue 6): peak memory at most a quarter of the A1111 approach's, wall
time no worse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_merge import io_floor, timed  # noqa: E402  (the same measurements: I/O floor, GNU time's peak RSS)
from core.io.sd import is_buffer  # noqa: E402
from tests.fixtures import sd_checkpoints as F  # noqa: E402

BIN = Path(sys.executable).parent

# SD 1.5 at its real widths (v1-inference.yaml): the fixture's structure, the real sizes.
SD15 = dict(F.ARCH["sd1"], ch=320, ctx=768, te_width=768, te_inter=3072, vocab=49408)
VAE_CH = 128
SD15_PARAMS = 1_066_235_307  # UNet 859.5 M + CLIP-L text 123.1 M + VAE 83.7 M
RECIPES = ("weighted_sum", "add_difference")

# 26 values, BASE, IN00..IN11, M00, OUT00..OUT11 (supermerger's order).
ALPHA_V = [0.5] + [round(1 - i / 12, 4) for i in range(12)] + [0.0] + [round((i + 1) / 12, 4) for i in range(12)]
MULTIPLIER = [1.0] + [round(0.5 + i / 22, 4) for i in range(12)] + [1.0] + [round(1 - i / 22, 4) for i in range(12)]

A1111_SCRIPT = '''\
"""The A1111 approach: every state dict whole in memory, merged key by key, saved at once."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from core.io.sd import LDM, SD1, is_buffer
from core.merge.blocks import BlockMap

spec = json.loads(open(sys.argv[1]).read())
theta = [load_file(path) for path in spec["inputs"]]
merged = theta[0]
blocks = BlockMap(SD1, LDM, list(merged))
for key in list(merged):
    if is_buffer(key):  # noise schedule, position ids: model A's, as the engine keeps them
        continue
    value = blocks.pick(spec["setting"], key)
    value = float(spec["setting"]["default"] if value is None else value)
    x = [t[key].float() for t in theta]
    if spec["method"] == "weighted_sum":  # A·(1 − alpha) + B·alpha
        out = torch.add(x[0] * (1.0 - value), x[1], alpha=value)
    else:  # A + multiplier·(B − C)
        out = (x[1] - x[2]).mul_(value).add_(x[0])
    merged[key] = out.to(merged[key].dtype)
save_file(merged, spec["output"], metadata={"format": "pt"})
'''


def build_checkpoints(root: Path, log) -> tuple[dict[str, Path], int]:
    """A, B, C as fp16 single files at SD 1.5's widths; also returns the parameter count."""
    shapes = F.ldm_shapes("sd1", arch=SD15, vae_ch=VAE_CH)
    params = sum(math.prod(s) for name, s in shapes.items() if not is_buffer(name))
    if abs(params - SD15_PARAMS) > 0.01 * SD15_PARAMS:
        raise SystemExit(f"the synthetic checkpoint has {params:,} parameters, not SD 1.5's {SD15_PARAMS:,}")
    paths = {}
    for label, seed in (("A", 1), ("B", 2), ("C", 3)):
        start = time.perf_counter()
        paths[label] = F.make_checkpoint(root / f"sd15-{label}.safetensors", "sd1", seed, arch=SD15, vae_ch=VAE_CH)
        log(f"built {label}: {paths[label].stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    return paths, params


def recipe_settings(paths: dict[str, Path]) -> dict[str, tuple[dict, dict, list[Path]]]:
    """name -> (recipe, block setting, inputs in A, B, C order)."""
    alpha = {"blocks": ",".join(map(str, ALPHA_V)), "default": 0.5}
    mult = {"blocks": ",".join(map(str, MULTIPLIER)), "default": 1.0}
    ab, abc = [paths["A"], paths["B"]], [paths["A"], paths["B"], paths["C"]]
    return {
        "weighted_sum": ({"merge_method": "weighted_sum", "models": [{"model": str(p)} for p in ab],
                          "parameters": {"alpha": alpha}}, alpha, ab),
        "add_difference": ({"merge_method": "add_difference", "models": [{"model": str(p)} for p in abc],
                            "parameters": {"multiplier": mult}}, mult, abc),
    }


def max_difference(ours: Path, theirs: Path) -> float:
    """Largest |ours − theirs| over every tensor (one tensor at a time); exits if keys or dtypes differ."""
    worst = 0.0
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        if set(a.keys()) != set(b.keys()):
            raise SystemExit(f"the outputs hold different tensors: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape:
                raise SystemExit(f"tensor '{key}': {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            if x.numel():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def run_recipe(name: str, recipe: dict, setting: dict, inputs: list[Path], work: Path, runs: int, log) -> dict:
    """Alternate both approaches on one recipe; medians and the outputs' difference."""
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ours_out, theirs_out = work / f"ours-{name}.safetensors", work / f"a1111-{name}.safetensors"
    spec = work / f"{name}-a1111.json"
    spec.write_text(json.dumps({"method": name, "inputs": [str(p) for p in inputs], "setting": setting,
                                "output": str(theirs_out)}))
    ours_cmd = [str(BIN / "mergestudio"), "merge", str(recipe_path), "-o", str(ours_out), "--device", "cpu", "--json"]
    theirs_cmd = [sys.executable, str(work / "a1111_merge.py"), str(spec)]
    timings: dict[str, list[tuple[float, float]]] = {"ours": [], "a1111": []}
    inside = []  # the engine's own merge time, without Python and torch start-up
    for i in range(runs + 1):  # the first pair warms the page cache and the imports
        for label, cmd, out in (("ours", ours_cmd, ours_out), ("a1111", theirs_cmd, theirs_out)):
            out.unlink(missing_ok=True)
            wall, rss, stdout = timed(cmd)
            log(f"  {name} {'warm-up' if i == 0 else f'run {i}'} {label:>5}: {wall:6.2f} s, {rss:5.2f} GB")
            if i > 0:
                timings[label].append((wall, rss))
                if label == "ours":
                    inside.append(json.loads(stdout)["seconds"])
    diff = max_difference(ours_out, theirs_out)
    size = ours_out.stat().st_size
    ours_out.unlink()
    theirs_out.unlink()
    floor = statistics.median(io_floor(inputs, size, work) for _ in range(3))
    fig = {label: {"wall_s": statistics.median(w for w, _ in t), "peak_rss_gb": statistics.median(r for _, r in t),
                   "runs": [{"wall_s": w, "peak_rss_gb": r} for w, r in t]} for label, t in timings.items()}
    fig["ours"]["merge_s"] = statistics.median(inside)
    fig["time_ratio"] = fig["ours"]["wall_s"] / fig["a1111"]["wall_s"]
    fig["memory_ratio"] = fig["ours"]["peak_rss_gb"] / fig["a1111"]["peak_rss_gb"]
    fig["io_floor_s"] = floor
    fig["output_bytes"] = size
    fig["max_abs_diff"] = diff
    fig["targets_met"] = {"memory": fig["memory_ratio"] <= 0.25, "time": fig["time_ratio"] <= 1.0}
    return fig


def table(results: dict[str, dict]) -> str:
    lines = [
        "| recipe (block weights) | Merge Studio (wall, peak RSS) | A1111 approach (wall, peak RSS) | time ratio "
        "| peak RSS ratio | I/O floor | merge alone (no start-up) | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        o, t = r["ours"], r["a1111"]
        lines.append(
            f"| {name} | {o['wall_s']:.2f} s, {o['peak_rss_gb']:.2f} GB "
            f"| {t['wall_s']:.2f} s, {t['peak_rss_gb']:.2f} GB "
            f"| {r['time_ratio']:.2f} | {r['memory_ratio']:.2f} | {r['io_floor_s']:.2f} s | {o['merge_s']:.2f} s "
            f"| {r['max_abs_diff']:.3g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each approach (after one warm-up pair)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (progress goes to stderr)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the temporary folder is made")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    stream = sys.stderr if args.json else sys.stdout

    def log(text: str) -> None:
        print(text, file=stream, flush=True)

    base = args.tmpdir or Path(tempfile.gettempdir())
    need = 2.2e9 * (3 + 3)  # three inputs, two outputs, the I/O floor's file
    if shutil.disk_usage(base).free < need:
        raise SystemExit(f"{base}: needs {need / 1e9:.0f} GB free disk for the benchmark files")
    with tempfile.TemporaryDirectory(prefix="bench-sd-", dir=base) as tmp:
        work = Path(tmp)
        paths, params = build_checkpoints(work, log)
        size = paths["A"].stat().st_size
        log(f"checkpoints: 3 x {size / 1e9:.2f} GB fp16, {params / 1e9:.3f} B parameters each "
            "(SD 1.5: UNet + CLIP-L + VAE)")
        log(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}, runs: {args.runs} (+1 warm-up)")
        (work / "a1111_merge.py").write_text(A1111_SCRIPT)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        results = {}
        for name, (recipe, setting, inputs) in recipe_settings(paths).items():
            if name in args.recipes:
                results[name] = run_recipe(name, recipe, setting, inputs, work, args.runs, log)
    if args.json:
        print(json.dumps({"checkpoint": {"parameters": params, "bytes": size, "dtype": "float16"},
                          "runs": args.runs, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "recipes": results}, indent=2))
        return
    print()
    print(table(results))
    for name, r in results.items():
        missed = [k for k, ok in r["targets_met"].items() if not ok]
        verdict = "targets met" if not missed else f"missed: {', '.join(missed)}"
        print(f"{name}: peak RSS {r['memory_ratio']:.2f} of the A1111 approach (target <= 0.25), "
              f"wall time {r['time_ratio']:.2f} of it (target <= 1.00): {verdict}")


if __name__ == "__main__":
    main()
