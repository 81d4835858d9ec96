"""``mergestudio compare text|image``: the same prompt through several models, side by side.

    mergestudio compare text MODEL... --prompt P [--seed S] [--max-new-tokens N]
                     [--temperature T] [--top-p P] [--top-k K] [--repetition-penalty R]
                     [--recipe RECIPE.yaml ...] [--chat] [--device auto|cpu|cuda] [--json]
    mergestudio compare image PIPELINE... --prompt P [--negative-prompt N] [--seed S]
                     [--steps N] [--height H] [--width W] [--guidance G]
                     [--token-merging RATIO] --out DIR [--device ...] [--json]

Text panes stream to stdout one after another (``== label ==`` then the text as
it is generated); ``--json`` prints only the results. A pane that fails says why
on stderr and the others go on; the exit status is 1 when every pane failed.
Images are written to DIR as ``paneN-label.png`` (and ``diff-NN-MM.png`` for each
pane against the first) with ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import MergeStudioError


def add_parser(sub: Any) -> None:
    """Register ``compare text|image`` on the top-level subparsers."""
    compare = sub.add_parser("compare", help="the same prompt and seed through 2-4 models, side by side")
    csub = compare.add_subparsers(dest="compare_command", required=True, metavar="text|image")
    hidden = {"action": "store_true", "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}

    text = csub.add_parser("text", help="generate text with 2-4 causal LMs (folders or recipes merged in memory)")
    text.add_argument("models", nargs="*", metavar="MODEL", help="causal LM folders")
    text.add_argument("--recipe", action="append", default=[], type=Path,
                      help="a mergekit recipe merged in memory as one more pane (nothing is written)")
    text.add_argument("--prompt", required=True)
    text.add_argument("--seed", type=int, default=0)
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    text.add_argument("--top-p", type=float, default=1.0)
    text.add_argument("--top-k", type=int, default=0)
    text.add_argument("--repetition-penalty", type=float, default=1.0)
    text.add_argument("--chat", action="store_true", help="wrap the prompt in each tokenizer's chat template")
    text.add_argument("--device", default="auto")
    text.add_argument("--json", action="store_true")
    text.add_argument("--debug", **hidden)

    image = csub.add_parser("image", help="generate images with 2-4 diffusers pipelines")
    image.add_argument("pipelines", nargs="+", metavar="PIPELINE", help="diffusers pipeline folders")
    image.add_argument("--prompt", required=True)
    image.add_argument("--negative-prompt", default="")
    image.add_argument("--seed", type=int, default=0)
    image.add_argument("--steps", type=int, default=20)
    image.add_argument("--height", type=int, default=512)
    image.add_argument("--width", type=int, default=512)
    image.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    image.add_argument("--token-merging", type=float, metavar="RATIO",
                       help="add a pane: the first pipeline with tomesd token merging at this ratio")
    image.add_argument("--out", type=Path, required=True, help="folder for the images and results.json")
    image.add_argument("--device", default="auto")
    image.add_argument("--json", action="store_true")
    image.add_argument("--debug", **hidden)


def _device(name: str) -> str:
    from core.merge.executor import resolve_device

    return resolve_device(name)


def _label(path: Path, taken: set[str]) -> str:
    """The folder's name, made unique among the panes (``a``, ``a (2)``)."""
    from core.generate import unique_label

    return unique_label(path.name or str(path), taken)


def run(args: argparse.Namespace) -> int:
    if args.compare_command == "text":
        return _text(args)
    return _image(args)


def _text(args: argparse.Namespace) -> int:
    from core.generate.text import PaneFinished, PaneStarted, PaneToken, TextSettings, TextSource, iter_compare_text

    taken: set[str] = set()
    sources = [TextSource(label=_label(Path(m), taken), model=str(m)) for m in args.models]
    sources += [TextSource(label=_label(Path(r).with_suffix(""), taken) + " (in memory)", recipe=str(r))
                for r in args.recipe]
    settings = TextSettings(prompt=args.prompt, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, chat_template=args.chat)
    results = []
    work = iter_compare_text(sources, settings, device=_device(args.device))
    try:
        for event in work:
            if args.json:
                if isinstance(event, PaneFinished):
                    results.append(event.result)
                continue
            if isinstance(event, PaneStarted):
                print(f"== {event.label} ==", flush=True)
                print(args.prompt, end="", flush=True)
            elif isinstance(event, PaneToken):
                print(event.text, end="", flush=True)
            elif isinstance(event, PaneFinished):
                results.append(event.result)
                print(flush=True)
                print(_text_figures(event.result), flush=True)
    finally:
        work.close()
    for r in results:
        if r.status == "failed":
            print(f"mergestudio: pane '{r.label}' failed: {r.error}", file=sys.stderr)
    if args.json:
        print(json.dumps({"settings": settings.to_json(), "panes": [r.to_json() for r in results]}, indent=2))
    return 0 if any(r.status != "failed" for r in results) else 1


def _text_figures(r) -> str:
    if r.status == "failed":
        return f"-- failed: {r.error}"
    parts = [f"{r.new_tokens} tokens"]
    if r.ttft_s is not None:
        parts.append(f"first token {r.ttft_s * 1000:.0f} ms")
    if r.tokens_per_s is not None:
        parts.append(f"{r.tokens_per_s:.1f} tokens/s")
    if r.peak_memory_bytes is not None:
        parts.append(f"peak {r.peak_memory_bytes / 1e6:.0f} MB ({r.memory_kind})")
    parts.append(f"ended: {r.finish_reason or r.status}")
    return "-- " + ", ".join(parts)


def _image(args: argparse.Namespace) -> int:
    from core.generate.image import (ImageSettings, ImageSource, PaneFinished, PaneStep, difference_image,
                                     iter_compare_images)

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise MergeStudioError(f"--out {out} is a file, not a folder.")
    taken: set[str] = set()
    sources = [ImageSource(label=_label(Path(p), taken), pipeline=str(p)) for p in args.pipelines]
    if args.token_merging is not None:
        first = sources[0]
        sources.append(ImageSource(label=f"{first.label} + ToMe {args.token_merging:g}", pipeline=first.pipeline,
                                   token_merging={"method": "tomesd", "ratio": args.token_merging}))
    settings = ImageSettings(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                             steps=args.steps, height=args.height, width=args.width, guidance_scale=args.guidance)
    results = []
    work = iter_compare_images(sources, settings, device=_device(args.device))
    try:
        for event in work:
            if isinstance(event, PaneStep) and not args.json:
                print(f"\r{sources[event.pane].label}: step {event.step}/{event.total}", end="", file=sys.stderr,
                      flush=True)
            elif isinstance(event, PaneFinished):
                results.append(event.result)
                if not args.json:
                    print(file=sys.stderr)
    finally:
        work.close()
    out.mkdir(parents=True, exist_ok=True)
    panes = []
    first_ok = next((r for r in results if r.image is not None), None)
    for r in results:
        entry = r.to_json()
        if r.image is not None:
            entry["file"] = str(r.save(out))
            if first_ok is not None and r is not first_ok:
                diff, stats = difference_image(first_ok.image, r.image)
                diff_path = out / f"diff-{first_ok.pane:02d}-{r.pane:02d}.png"
                _save_png(diff, diff_path)
                entry["difference"] = {"against": first_ok.label, "file": str(diff_path), **_finite(stats)}
        else:
            print(f"mergestudio: pane '{r.label}' {r.status}: {r.error}", file=sys.stderr)
        panes.append(entry)
        if not args.json:
            print(_image_figures(r, entry))
    report = {"settings": settings.to_json(), "panes": panes}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "results.json")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if any(r.image is not None for r in results) else 1


def _finite(stats: dict) -> dict:
    """JSON has no infinity: an infinite PSNR (identical images) is written as null."""
    import math

    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in stats.items()}


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _image_figures(r, entry: dict) -> str:
    if r.image is None:
        return f"{r.label}: {r.status} ({r.error})"
    parts = [f"{r.seconds:.2f} s" if r.seconds is not None else "", entry.get("file", "")]
    if r.peak_memory_bytes is not None:
        parts.append(f"peak {r.peak_memory_bytes / 1e6:.0f} MB")
    diff = entry.get("difference")
    if diff:
        parts.append(f"mean |difference| vs {diff['against']} {diff['mean_abs']:.4f}")
    return f"{r.label}: " + ", ".join(p for p in parts if p)
