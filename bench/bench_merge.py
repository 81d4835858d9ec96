"""Benchmark: `mergestudio merge` against `mergekit-yaml` on the same recipes.

Builds (once, cached under bench/out/models) a base and three variants of a
Llama-style model of about 500 MB each in bf16, then for each method runs both
tools on the same recipe, alternating, after one warm-up run each, and prints
the median wall time and peak RSS of each, their ratios, and the I/O floor
(reading every input once and writing one output of the same size, with fsync).

    python bench/bench_merge.py [--runs 3] [--methods linear ties] [--layers 12]

Timings are medians of warm runs; both tools run in the same session on the
same files, so the ratios are what matter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BIN = Path(sys.executable).parent

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_hidden_layers": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def build_models(root: Path, layers: int) -> dict[str, Path]:
    cfg = dict(CONFIG, num_hidden_layers=layers)
    names = ["base", "a", "b", "c"]
    paths = {n: root / f"llama-{layers}L-{n}" for n in names}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return paths
    shapes = llama_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for n, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        if n == "base":
            tensors = base
        else:
            tensors = {}
            for k, t in base.items():
                delta = torch.randn(t.shape, generator=gen) * 0.002
                tensors[k] = (t.float() + delta).to(torch.bfloat16)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return paths


def recipes(models: dict[str, Path]) -> dict[str, str]:
    m = {k: str(v) for k, v in models.items()}
    return {
        "linear": f"""merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 0.5}}
  - model: {m['b']}
    parameters: {{weight: 0.3}}
  - model: {m['c']}
    parameters: {{weight: 0.2}}
dtype: bfloat16
""",
        "ties": f"""merge_method: ties
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m['b']}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {m['c']}
    parameters: {{weight: 0.2, density: 0.5}}
dtype: bfloat16
""",
    }


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and stdout of a command, via GNU time."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb / 1e6, proc.stdout


def io_floor(files: list[Path], out_bytes: int, scratch: Path) -> float:
    """Read each input file once and write one output of ``out_bytes``, with fsync."""
    buf = bytearray(64 * 1024 * 1024)
    view = memoryview(buf)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    target = scratch / "floor.bin"
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            f.write(view[:n])
            left -= n
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"])
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()

    OUT.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    models = build_models(OUT / "models", args.layers)
    size = (models["base"] / "model.safetensors").stat().st_size
    print(f"models: 4 x {size / 1e6:.0f} MB bf16 ({args.layers} layers), built/cached in {time.perf_counter() - t0:.1f} s")
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")

    results = {}
    for method, text in recipes(models).items():
        if method not in args.methods:
            continue
        recipe = OUT / f"{method}.yaml"
        recipe.write_text(text)
        ours_out, theirs_out = OUT / f"ours-{method}", OUT / f"mergekit-{method}"
        ours_cmd = [str(BIN / "mergestudio"), "merge", str(recipe), "-o", str(ours_out), "--overwrite", "--device", "cpu", "--json"]
        theirs_cmd = [str(BIN / "mergekit-yaml"), str(recipe), str(theirs_out), "--no-copy-tokenizer", "--quiet"]
        inputs = ["a", "b", "c"] + (["base"] if "base_model" in text else [])
        timings = {"ours": [], "mergekit": []}
        inside = []  # mergestudio's own merge time, without Python and torch start-up
        for i in range(args.runs + 1):  # the first pair warms the page cache and imports
            for label, cmd, out in (("ours", ours_cmd, ours_out), ("mergekit", theirs_cmd, theirs_out)):
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, stdout = timed(cmd)
                if i > 0:
                    timings[label].append((wall, rss))
                    if label == "ours":
                        inside.append(json.loads(stdout)["seconds"])
        files = [models[name] / "model.safetensors" for name in inputs]
        floor = statistics.median(io_floor(files, size, OUT) for _ in range(3))
        ours_t = statistics.median(w for w, _ in timings["ours"])
        theirs_t = statistics.median(w for w, _ in timings["mergekit"])
        ours_m = statistics.median(r for _, r in timings["ours"])
        theirs_m = statistics.median(r for _, r in timings["mergekit"])
        merge_t = statistics.median(inside)
        results[method] = (ours_t, ours_m, theirs_t, theirs_m, floor, merge_t)
        print(
            f"{method:>7}: mergestudio {ours_t:6.2f} s {ours_m:5.2f} GB | mergekit {theirs_t:6.2f} s {theirs_m:5.2f} GB | "
            f"speed-up x{theirs_t / ours_t:4.1f}, memory {ours_m / theirs_m:4.2f} of mergekit | "
            f"I/O floor {floor:5.2f} s, mergestudio = {ours_t / floor:4.1f} x floor "
            f"(merge alone {merge_t:5.2f} s = {merge_t / floor:4.1f} x floor)",
            flush=True,
        )
    print(
        "\n| method | Merge Studio (wall, peak RSS) | mergekit 0.1.5 | speed-up | peak RSS ratio "
        "| I/O floor | merge alone (no start-up) | merge alone / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, (ot, om, tt, tm, fl, mt) in results.items():
        print(
            f"| {method} | {ot:.2f} s, {om:.2f} GB | {tt:.2f} s, {tm:.2f} GB | {tt / ot:.1f}x | {om / tm:.2f} "
            f"| {fl:.2f} s | {mt:.2f} s | {mt / fl:.1f}x |"
        )


if __name__ == "__main__":
    main()
