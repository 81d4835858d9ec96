"""``mergestudio lora merge|combine|extract|show``.

    mergestudio lora merge MODEL LORA[:STRENGTH] [LORA[:STRENGTH] ...] -o OUT [--overwrite] [--json]
    mergestudio lora combine LORA... --method linear|ties|dare_linear|dare_ties [--weights W ...]
                     [--density D ...] [--rank R | --energy E] [--seed N] -o OUT [--json]
    mergestudio lora extract BASE TUNED -o OUT (--rank R | --energy E) [--format auto|peft|kohya]
                     [--modules REGEX] [--dtype float16] [--svd auto|exact|randomized] [--device auto] [--json]
    mergestudio lora show LORA [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from core.lora.combine import METHODS
from core.lora.factor import SVD_CHOICES


def _numbers(text: str) -> list[float]:
    """'0.5' or '0.5,0.3' -> floats (so --weights 0.5 0.3 and --weights 0.5,0.3 both work)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or a comma-separated list of numbers") from None


def _flat(values: Any) -> Any:
    return None if values is None else [x for group in values for x in group]


def add_parser(sub: Any) -> None:
    """Register ``lora`` and its subcommands on the top-level subparsers."""
    from core.cli import parse_size

    lora = sub.add_parser("lora", help="LoRA: merge into a model, combine several, extract from two models, show")
    lsub = lora.add_subparsers(dest="lora_command", required=True, metavar="merge|combine|extract|show")
    hidden = {"action": "store_true", "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}

    merge = lsub.add_parser(
        "merge",
        help="merge LoRAs into a model: W + strength × (alpha / r) × B·A",
        description="Merges each LoRA at its strength (LORA:0.7; default 1) into MODEL, tensor by tensor. "
        "The output has MODEL's layout: a .safetensors file for a single file, a folder for a folder.",
    )
    merge.add_argument("model", help="the model: HF folder, single .safetensors file or diffusers pipeline")
    merge.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]", help="PEFT adapter folder or LoRA .safetensors")
    merge.add_argument("-o", "--output", type=Path, required=True)
    merge.add_argument("--shard-size", type=parse_size, default="5GB", help="largest shard of a folder output")
    merge.add_argument("--allow-pickle", action="store_true", help="load a .bin/.ckpt model with weights_only=True")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--json", action="store_true")
    merge.add_argument("--debug", **hidden)

    combine = lsub.add_parser(
        "combine",
        help="combine LoRAs into one (linear: exact, ranks concatenated; ties/dare: re-factored by SVD)",
        description="linear writes sum(w_i × scale_i × B_i·A_i) exactly as one LoRA of rank sum(r_i) (or "
        "re-factored with --rank/--energy); ties, dare_linear and dare_ties merge the dense updates with the "
        "engine's methods and re-factor them to --rank (or --energy) by truncated SVD.",
    )
    combine.add_argument("loras", nargs="+", metavar="LORA")
    combine.add_argument("--method", choices=METHODS, default="linear")
    combine.add_argument("--weights", nargs="+", type=_numbers, help="one per LoRA (default 1 each)")
    combine.add_argument("--density", nargs="+", type=_numbers, help="share kept (ties, dare): one, or one per LoRA")
    target = combine.add_mutually_exclusive_group()
    target.add_argument("--rank", type=int, help="rank of the output (required for ties and dare)")
    target.add_argument("--energy", type=float, help="instead of --rank: keep this share of sum(sigma^2)")
    combine.add_argument("--seed", type=int, default=0, help="seed of DARE's drops and the randomized SVD")
    combine.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the inputs')")
    combine.add_argument("--svd", choices=SVD_CHOICES, default="auto")
    combine.add_argument("-o", "--output", type=Path, required=True)
    combine.add_argument("--overwrite", action="store_true")
    combine.add_argument("--json", action="store_true")
    combine.add_argument("--debug", **hidden)

    extract = lsub.add_parser(
        "extract",
        help="extract a LoRA from TUNED − BASE by truncated SVD",
        description="Factors the difference of every weight that changed by truncated SVD, at --rank or at the "
        "smallest rank keeping --energy of the squared singular values. Writes a PEFT adapter folder "
        "(transformers models) or a kohya .safetensors file (Stable Diffusion).",
    )
    extract.add_argument("base", help="the base model")
    extract.add_argument("tuned", help="the fine-tuned model")
    extract.add_argument("-o", "--output", type=Path, required=True)
    target = extract.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int)
    target.add_argument("--energy", type=float, help="share of sum(sigma^2) to keep, in (0, 1], e.g. 0.9")
    extract.add_argument("--format", choices=("auto", "peft", "kohya"), default="auto",
                         help="default: peft for transformers models, kohya for Stable Diffusion")
    extract.add_argument("--modules", metavar="REGEX", help="only tensors whose name matches this regular expression")
    extract.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the models')")
    extract.add_argument("--svd", choices=SVD_CHOICES, default="auto",
                         help="exact, randomized, or auto: exact up to 1024 on the short side (default)")
    extract.add_argument("--device", default="auto", help="auto, cpu or cuda")
    extract.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    extract.add_argument("--allow-pickle", action="store_true")
    extract.add_argument("--overwrite", action="store_true")
    extract.add_argument("--json", action="store_true")
    extract.add_argument("--debug", **hidden)

    show = lsub.add_parser("show", help="what a LoRA file holds: format, modules, ranks, scales (headers only)")
    show.add_argument("lora")
    show.add_argument("--json", action="store_true")
    show.add_argument("--debug", **hidden)


def run(args: argparse.Namespace) -> int:
    command = args.lora_command
    if command == "show":
        return _show(args)
    from core.jobs import TerminalProgress, drive

    progress = None if args.json else TerminalProgress(sys.stderr, label=command)
    try:
        if command == "merge":
            from core.lora.merge import iter_merge_lora, parse_spec

            work = iter_merge_lora(
                args.model, [parse_spec(s) for s in args.loras], args.output,
                overwrite=args.overwrite, allow_pickle=args.allow_pickle, shard_size=args.shard_size,
            )
            result = drive(work, progress)
            summary = _merge_summary(result)
        elif command == "combine":
            from core.lora.combine import iter_combine

            work = iter_combine(
                args.loras, args.output, method=args.method, weights=_flat(args.weights), density=_flat(args.density),
                rank=args.rank, energy=args.energy, seed=args.seed, dtype=args.dtype, svd=args.svd,
                overwrite=args.overwrite,
            )
            result = drive(work, progress)
            summary = _combine_summary(result, args)
        else:
            from core.lora.extract import iter_extract

            work = iter_extract(
                args.base, args.tuned, args.output, rank=args.rank, energy=args.energy, format=args.format,
                modules=args.modules, dtype=args.dtype, svd=args.svd, device=args.device, seed=args.seed,
                overwrite=args.overwrite, allow_pickle=args.allow_pickle,
            )
            result = drive(work, progress)
            summary = _extract_summary(result)
    finally:
        if progress is not None:
            progress.clear()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(summary["text"])
    return 0


def _merge_summary(result: Any) -> dict[str, Any]:
    text = (
        f"Merged {result.modules} LoRA modules into {result.changed} of {result.tensors} tensors "
        f"(the others copied unchanged): {result.output} ({result.bytes_written / 1e9:.2f} GB) "
        f"in {result.seconds:.1f} s."
    )
    return {
        "output": str(result.output), "tensors": result.tensors, "changed": result.changed, "modules": result.modules,
        "bytes": result.bytes_written, "seconds": round(result.seconds, 3), "files": result.files, "text": text,
    }


def _combine_summary(result: Any, args: argparse.Namespace) -> dict[str, Any]:
    ranks = sorted(set(result.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    if result.exact:
        how = "exact: the ranks are concatenated, so the result equals the weighted sum"
    else:
        worst = max(result.errors.values(), default=0.0)
        how = f"re-factored by truncated SVD; largest error {100 * worst:.2f} % of a module's update"
    text = (
        f"Combined {len(args.loras)} LoRAs by {result.method} into {result.output} ({result.format}): "
        f"{result.modules} modules of rank {rank_text} ({how})."
    )
    return {
        "output": str(result.output), "method": result.method, "format": result.format, "modules": result.modules,
        "ranks": result.ranks, "exact": result.exact, "relative_errors": result.errors,
        "seconds": round(result.seconds, 3), "text": text,
    }


def _extract_summary(result: Any) -> dict[str, Any]:
    reports = result.modules
    ranks = [r.rank for r in reports]
    errors = [r.relative_error for r in reports]
    methods = sorted({r.svd for r in reports})
    if len(set(ranks)) == 1:
        rank_text = str(ranks[0])
    else:
        rank_text = f"{min(ranks)}–{max(ranks)} (median {statistics.median(ranks):g})"
    lines = [
        f"Extracted {len(reports)} modules ({result.format}) into {result.output}: rank {rank_text}"
        + f"; reconstruction error median {100 * statistics.median(errors):.2f} %, largest {100 * max(errors):.2f} % "
        f"of a module's ||ΔW|| (SVD: {', '.join(methods)}); {result.unchanged} unchanged modules left out.",
    ]
    if result.skipped:
        lines.append(
            f"Changed but not in the LoRA ({len(result.skipped)} tensors; a LoRA holds only linear and conv layers):"
        )
        for name, why in list(result.skipped.items())[:8]:
            lines.append(f"  {name}: {why}")
        if len(result.skipped) > 8:
            lines.append(f"  ... and {len(result.skipped) - 8} more (--json lists them all)")
    return {
        "output": str(result.output),
        "format": result.format,
        "modules": [
            {"module": r.module, "tensor": r.tensor, "rank": r.rank, "error": r.error, "norm": r.norm,
             "relative_error": r.relative_error, "svd": r.svd}
            for r in reports
        ],
        "unchanged": result.unchanged,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "text": "\n".join(lines),
    }


def _show(args: argparse.Namespace) -> int:
    from core.lora.formats import open_lora

    with open_lora(args.lora) as lora:
        modules = list(lora.modules.values())
        ranks = sorted({m.rank for m in modules})
        scales = sorted({round(lora.scale(m), 6) for m in modules})
        components = sorted({m.component or "model" for m in modules})
        dtypes = sorted({lora.tensors[m.up].dtype for m in modules})
        info = {
            "path": str(lora.path),
            "format": lora.format,
            "modules": len(modules),
            "ranks": ranks,
            "scales": scales,
            "components": components,
            "dtypes": dtypes,
            "base_model": (lora.config or {}).get("base_model_name_or_path"),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rank_text = ", ".join(map(str, ranks))
    print(f"{info['path']}: {lora.format} LoRA, {len(modules)} modules ({', '.join(components)}), "
          f"rank {rank_text}, scale alpha/r = {', '.join(f'{s:g}' for s in scales)}, {', '.join(dtypes)}"
          + (f", for {info['base_model']}" if info["base_model"] else "") + ".")
    return 0
