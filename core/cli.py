"""The ``mergestudio`` command.

The engine's command line (headless; ``mergestudio`` without arguments opens the
app through ``app/launcher.py``, which calls this for everything else):

    mergestudio merge RECIPE.yaml -o OUT [--device auto|cpu|cuda] [--seed N]
                      [--shard-size 5GB] [--allow-pickle] [--overwrite] [--json]
    mergestudio check RECIPE.yaml [--allow-pickle] [-o OUT] [--json]
    mergestudio methods [--json]
    mergestudio tokens bench MODEL|--tiny vit|bert|unet --method tome|pitome|tomesd|todo
                      [--r N | --ratio X | --threshold T] [--KEY VALUE ...] [--resolution PX]
                      [--batch N] [--runs 5] [--device auto|cpu|cuda] [--preset FILE] [--json]
    mergestudio models scan FOLDER... [--hf-cache] [--json]    (see core/library_cli.py)
    mergestudio models demo [DEST] [--json]
    mergestudio sessions list [--json]                          (see core/sessions/cli.py)
    mergestudio sessions show ID [--json]
    mergestudio lora merge|combine|extract|show ...             (see core/lora/cli.py)
    mergestudio compare text|image ...                          (see core/generate/cli.py)
    mergestudio inspect attention|tokens|diff ...               (see core/inspect/cli.py)

Exit status 0 on success; otherwise 1 (bad input, one line on stderr), 130
(cancelled with Ctrl-C) or 2 (usage). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from core.errors import CancelledError, MergeStudioError


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (examples: 5GB, 500MB, 2GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.lower()]
    value = int(float(number) * base**power)
    if value <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line too (exit status 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help').\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mergestudio",
        description="Merge Studio: compare and merge models. Without any argument, mergestudio opens the app.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command")

    merge = sub.add_parser("merge", help="merge a recipe (mergekit YAML) into a folder")
    merge.add_argument("recipe", type=Path)
    merge.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    merge.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (default: 0)")
    merge.add_argument("--shard-size", type=parse_size, default="5GB", help="largest shard (default: 5GB)")
    merge.add_argument("--allow-pickle", action="store_true", help="load .bin/.ckpt/.pt with weights_only=True")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    merge.add_argument("--json", action="store_true", help="print the result as JSON")
    merge.add_argument("--no-card", action="store_true", help="do not write the model card (README.md)")
    merge.add_argument(
        "--progress-jsonl",
        action="store_true",
        help="machine-readable: one JSON object per line on stdout (progress, then result or error); "
        "a line 'cancel' or end-of-file on stdin cancels the merge",
    )
    merge.add_argument("--tensor-delay", type=float, default=0.0, metavar="SECONDS", help=argparse.SUPPRESS)
    merge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a recipe and print the plan and estimates")
    check.add_argument("recipe", type=Path)
    check.add_argument("-o", "--output", type=Path, help="check free disk space for this output folder")
    check.add_argument("--allow-pickle", action="store_true")
    check.add_argument("--json", action="store_true")
    check.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    methods = sub.add_parser("methods", help="list the merge methods and their parameters")
    methods.add_argument("--json", action="store_true")
    methods.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    tokens = sub.add_parser("tokens", help="token merging (ToMe and relatives): benchmark a model")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="bench")
    bench = tokens_sub.add_parser(
        "bench",
        allow_abbrev=False,
        help="time a model with and without token merging; tokens per layer, memory, fidelity",
        description=(
            "Runs MODEL warm with and without token merging (same process, alternating runs, medians) and prints "
            "time per forward, speed-up, peak memory, tokens per layer and output fidelity. Other options of the "
            "method go as --KEY VALUE (e.g. --sx 2 --use_rand false; see core.tokens.methods())."
        ),
    )
    bench.add_argument("model", nargs="?", type=Path, help="a local model folder (HF ViT/DeiT/BERT/CLIP, diffusers)")
    bench.add_argument(
        "--tiny", choices=("vit", "bert", "unet"), help="instead of MODEL: a random model of the usual shape"
    )
    bench.add_argument("--tiny-size", choices=("full", "small"), default="full", help=argparse.SUPPRESS)
    bench.add_argument("--method", help="tome, pitome, tomesd or todo (default: the preset's, else tome)")
    bench.add_argument(
        "--preset",
        type=Path,
        help="a token preset (JSON, see resources/presets/tokens/): its method and options; options given "
        "here too override the preset's",
    )
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument(
        "--r", type=_parse_r, help="tokens merged per layer: N, one per layer N,N,..., or N,INFLECTION (e.g. 13,-1.0)"
    )
    amount.add_argument("--ratio", type=float, help="fraction of tokens merged (tomesd; todo: --downsample_factor)")
    amount.add_argument("--threshold", type=_parse_numbers, help="merge pairs above this cosine (or one per layer)")
    bench.add_argument("--resolution", type=int, help="image size in px (UNet: default 512; ViTs use their own)")
    bench.add_argument("--batch", type=int, help="samples per forward (default: 8, UNet 2)")
    bench.add_argument("--runs", type=int, default=5, help="timed forwards each way (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed forwards first, each way (default: 1)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    bench.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    bench.add_argument("--attn", choices=("eager", "sdpa"), help="attention implementation of transformers models")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(method_options={})
    parser._tokens_bench = bench  # type: ignore[attr-defined]  # read by _split_method_options

    from core.library_cli import add_parser as add_models_parser  # mergestudio models scan|demo

    add_models_parser(sub)

    from core.sessions.cli import add_parser as add_sessions_parser  # mergestudio sessions list|show

    add_sessions_parser(sub)

    from core.lora.cli import add_parser as add_lora_parser  # mergestudio lora merge|combine|extract|show

    add_lora_parser(sub)

    from core.generate.cli import add_parser as add_compare_parser  # mergestudio compare text|image

    add_compare_parser(sub)

    from core.inspect.cli import add_parser as add_inspect_parser  # mergestudio inspect attention|tokens|diff

    add_inspect_parser(sub)
    return parser


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _parse_numbers(text: str) -> Any:
    """'0.9' -> 0.9, '0.9,0.8,0.7' -> [0.9, 0.8, 0.7]."""
    parts = text.split(",")
    if len(parts) == 1:
        return _number(parts[0])
    return [_number(p) for p in parts]


def _parse_r(text: str) -> Any:
    """'13' -> 13; '4,4,2' -> [4, 4, 2] (one per layer); '13,-1.0' -> (13, -1.0) (r, inflection)."""
    value = _parse_numbers(text)
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], float):
        return (value[0], value[1])
    return value


def _method_value(text: str) -> Any:
    """A --KEY VALUE of a token-merging method: true/false, none, a number, or a comma list."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    try:
        return _parse_numbers(text)
    except argparse.ArgumentTypeError:
        return text


def _split_method_options(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take the method's own ``--KEY VALUE`` options out of a ``tokens bench`` command line.

    Options ``tokens bench`` defines stay for argparse; any other ``--KEY VALUE`` (or
    ``--KEY=VALUE``) becomes a method option (``-`` in KEY read as ``_``), handed to
    ``core.tokens.apply``, which refuses a name the method does not have.
    """
    start = 0
    while start < len(argv) and argv[start] in ("--debug", "-h", "--help"):
        start += 1
    if argv[start : start + 2] != ["tokens", "bench"]:
        return argv, {}
    bench = parser._tokens_bench  # type: ignore[attr-defined]
    known = bench._option_string_actions
    kept, options = list(argv[: start + 2]), {}
    i = start + 2
    while i < len(argv):
        token = argv[i]
        if token == "--":
            kept.extend(argv[i:])
            break
        name, eq, inline = token.partition("=")
        if not token.startswith("--") or name in known:
            kept.append(token)
            action = known.get(name)
            if action is not None and action.nargs != 0 and not eq and i + 1 < len(argv):
                kept.append(argv[i + 1])  # its value, even one that starts with '-'
                i += 1
            i += 1
            continue
        key = name[2:].replace("-", "_")
        if not key.isidentifier():
            bench.error(f"'{token}' is not an option")
        if eq:
            text = inline
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            text = argv[i + 1]
            i += 1
        else:
            bench.error(f"the method option {name} needs a value ({name} VALUE)")
        if key in options:
            bench.error(f"the method option {name} is given twice")
        options[key] = _method_value(text)
        i += 1
    return kept, options


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, method_options = _split_method_options(parser, argv)
    args = parser.parse_args(argv)
    args.method_options = method_options
    if isinstance(args.__dict__.get("shard_size"), str):
        args.shard_size = parse_size(args.shard_size)
    if args.command is None:
        # `mergestudio` with no arguments opens the app (app/launcher.py); here, in
        # the headless engine, options without a command are a usage mistake.
        print("mergestudio: error: give a command (merge, check, methods, tokens, models, sessions, lora, compare, inspect); "
              "run mergestudio without arguments to open the app.", file=sys.stderr)
        return 2
    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "check":
            return _check(args)
        if args.command == "models":
            from core.library_cli import run as run_models

            return run_models(args)
        if args.command == "sessions":
            from core.sessions.cli import run as run_sessions

            return run_sessions(args)
        if args.command == "tokens":
            return _tokens_bench(args)
        if args.command == "lora":
            from core.lora.cli import run as run_lora

            return run_lora(args)
        if args.command == "compare":
            from core.generate.cli import run as run_compare

            return run_compare(args)
        if args.command == "inspect":
            from core.inspect.cli import run as run_inspect

            return run_inspect(args)
        return _methods(args)
    except BrokenPipeError:
        # The reader went away (`mergestudio methods | head`): not an error.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("mergestudio: cancelled; nothing was written.", file=sys.stderr)
        return 130
    except CancelledError as exc:
        print(f"mergestudio: {exc}", file=sys.stderr)
        return 130
    except MergeStudioError as exc:
        if args.debug:
            raise
        print(f"mergestudio: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so in one line, unless debugging
        if args.debug:
            raise
        print(
            f"mergestudio: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    """The message on one line, whatever a library put in it (stderr carries exactly one line)."""
    return " ".join(str(exc).split())


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``core.merge.run`` options of a ``merge`` command line (shared with ``--progress-jsonl``)."""
    return {
        "device": args.device,
        "seed": args.seed,
        "shard_size": args.shard_size,
        "overwrite": args.overwrite,
        "allow_pickle": args.allow_pickle,
        "model_card": not args.no_card,
        "tensor_delay_s": args.tensor_delay,
    }


def _merge(args: argparse.Namespace) -> int:
    if args.progress_jsonl:
        from core.merge.child import serve_jsonl  # the protocol of core.merge.child.ChildMerge

        return serve_jsonl(args)

    import core.merge as merge
    from core.jobs import TerminalProgress

    progress = None if args.json else TerminalProgress(sys.stderr)
    try:
        result = merge.run(args.recipe, args.output, on_progress=progress, **merge_options(args))
    finally:
        if progress is not None:
            progress.clear()  # an error or Ctrl-C: its one line replaces the unfinished bar
    summary = {
        "output": str(result.output),
        "tensors": result.tensors,
        "bytes": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "files": result.files,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"Merged {result.tensors} tensors ({result.bytes_written / 1e9:.2f} GB) into {result.output} "
            f"in {result.seconds:.1f} s on {result.device}."
        )
    return 0


def plan_summary(plan: Any, output: Optional[Path]) -> dict[str, Any]:
    """The plan as a JSON-ready dict (also used by the GUI's preflight view)."""
    import shutil

    # Without an output folder, the current folder is where the output would go.
    parent = Path(output).absolute().parent if output is not None else Path.cwd()
    free = shutil.disk_usage(parent).free if parent.exists() else None
    layers = sorted({op.layer for op in plan.ops if op.layer is not None})
    hooks = getattr(plan, "hooks", None)
    return {
        "method": plan.method.name,
        "models": [
            {
                "ref": m.ref,
                "path": str(m.source.path),
                "kind": m.source.kind,
                "layers": m.layout.count,
                "role": getattr(m, "role", "input"),
                "stable_diffusion": m.sd.to_dict() if getattr(m, "sd", None) is not None else None,
            }
            for m in plan.models
        ],
        "tensors": len(plan.ops),
        "ops": plan.method_summary(),
        "output_layers": len(layers),
        "output_bytes": plan.output_bytes,
        "input_bytes": plan.input_bytes,
        "peak_memory_bytes": plan.peak_memory_bytes,
        "free_disk_bytes": free,
        "out_dtype": sorted({op.out_dtype for op in plan.ops}),
        "notes": plan.notes,
        "stable_diffusion": _sd_summary(hooks),
        "block_weights": getattr(plan, "block_weights", None),
    }


def _sd_summary(hooks: Any) -> Optional[dict[str, Any]]:
    """The Stable Diffusion side of a plan: kind, layout, A1111 options (None for other models)."""
    if hooks is None or not hooks.is_sd:
        return None
    return {
        "kind": hooks.kind,
        "layout": hooks.layout,
        "unet_in_channels": hooks.out_channels,
        "inpainting_merge": hooks.inpainting_merge,
        "vae": hooks.vae_ref,
        "drop": hooks.drop,
        "ema": hooks.ema,
    }


def _check(args: argparse.Namespace) -> int:
    import core.merge as merge

    plan = merge.check(args.recipe, allow_pickle=args.allow_pickle, output=args.output)
    try:
        if args.json:
            print(json.dumps(plan_summary(plan, args.output), indent=2))
        else:
            print(format_plan(plan, str(args.recipe), args.output))
        return 0
    finally:
        plan.close()


def format_plan(plan: Any, recipe_label: str, output: Optional[Path] = None) -> str:
    """The preflight report as text: the CLI prints it, the app shows it."""
    info = plan_summary(plan, output)
    lines = [
        f"Recipe {recipe_label}: OK",
        f"Method: {plan.method.display_name} ({plan.method.name})  {plan.method.paper}",
        "Models:",
    ]
    for m, model in zip(info["models"], plan.models):
        where = "" if m["path"] == m["ref"] else f"  {m['path']}"
        if m["role"] == "vae":
            lines.append(f"  {m['ref']}  [VAE baked in]{where}")
        elif m["stable_diffusion"] is not None:
            lines.append(f"  {m['ref']}  [{model.sd.describe()}]{where}")
        else:
            lines.append(f"  {m['ref']}  [{m['kind']}, {m['layers']} layers]{where}")
    lines.extend(_sd_lines(info))
    ops = ", ".join(f"{n} {k}" for k, n in info["ops"].items())
    lines.append(f"Plan: {info['tensors']} tensors ({ops}), {info['output_layers']} output layers")
    lines.extend(_group_lines(plan))
    lines.append(f"Output size: {info['output_bytes'] / 1e9:.3f} GB ({', '.join(info['out_dtype'])})")
    lines.append(f"Peak memory (estimate): {info['peak_memory_bytes'] / 1e9:.2f} GB")
    if info["free_disk_bytes"] is not None:
        where = "at the output" if output is not None else "in the current folder"
        lines.append(f"Free disk {where}: {info['free_disk_bytes'] / 1e9:.1f} GB")
    lines.extend(f"Note: {note}" for note in plan.notes)
    return "\n".join(lines)


def _sd_lines(info: dict[str, Any]) -> list[str]:
    """Stable Diffusion options and the block weights applied, one line per parameter."""
    sd_info, table = info["stable_diffusion"], info["block_weights"]
    lines: list[str] = []
    if sd_info is not None:
        if sd_info["inpainting_merge"]:
            lines.append(
                f"Inpainting merge: model A's {sd_info['unet_in_channels']}-channel first convolution keeps its extra "
                "channels; the first 4 are merged."
            )
        options = []
        if sd_info["vae"]:
            options.append(f"VAE baked in from {sd_info['vae']}")
        if sd_info["drop"]:
            options.append("drop " + ", ".join(sd_info["drop"]))
        if sd_info["ema"] != "keep":
            options.append(f"ema {sd_info['ema']}")
        if options:
            lines.append("Options: " + "; ".join(options))
    if table:
        lines.append(f"Block weights ({table['architecture']}):")
        rows = [(name, values) for name, values in table["parameters"].items()]
        for ref, params in table["models"].items():
            rows += [(f"{name} [{ref}]", values) for name, values in params.items()]
        for name, values in rows:
            lines.append(f"  {name}: " + " ".join(f"{b}={_fmt(v)}" for b, v in values.items()))
    return lines


def _group_lines(plan: Any) -> list[str]:
    """The parameters shared by every tensor, then one line per tensor group.

    A group is a tensor name with its layer index replaced by N; a parameter
    that varies inside a group (a gradient) shows as its range over the layers.
    """
    values: dict[str, dict[str, list]] = {}
    for op in plan.ops:
        key = re.sub(r"\.\d+\.", ".N.", op.out_name)
        group = values.setdefault(key, {})
        if op.copy:
            group.setdefault("(copied)", []).append("")
            continue
        for name, value in _flat_params(op).items():
            group.setdefault(name, []).append(value)
    lines: list[str] = []
    everywhere = _constant_everywhere(values)
    if everywhere:
        lines.append("Parameters (all tensors): " + " ".join(f"{k}={_fmt(v)}" for k, v in everywhere.items()))
    lines.append("Tensor groups:")
    shown = list(values.items())
    for key, group in shown[:40]:
        count = max((len(v) for v in group.values()), default=1)
        parts = []
        for name, vals in group.items():
            if name in everywhere:
                continue
            if name == "(copied)":
                parts.append("copied")
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and len(set(vals)) > 1:
                parts.append(f"{name}={_fmt(min(vals))}..{_fmt(max(vals))}")
            else:
                parts.append(f"{name}={_fmt(vals[0])}" if len(set(map(str, vals))) == 1 else f"{name}=varies")
        lines.append(f"  {key:<50} x{count:<4} {' '.join(parts)}".rstrip())
    if len(shown) > 40:
        lines.append(f"  ... {len(shown) - 40} more groups")
    return lines


def _flat_params(op: Any) -> dict[str, Any]:
    """Global parameters by name, per-model ones as name[model index]."""
    flat = dict(op.params)
    for i, mp in enumerate(op.model_params):
        for name, value in mp.items():
            flat[f"{name}[{i}]"] = value
    return flat


def _constant_everywhere(values: dict[str, dict[str, list]]) -> dict[str, Any]:
    names: Optional[set[str]] = None
    for group in values.values():
        keys = {k for k in group if k != "(copied)"}
        if not keys:
            continue
        names = keys if names is None else names & keys
    result = {}
    for name in sorted(names or ()):
        seen = {str(v) for group in values.values() for v in group.get(name, [])}
        if len(seen) == 1:
            first = next(v for group in values.values() for v in group.get(name, []))
            result[name] = first
    return result


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _methods(args: argparse.Namespace) -> int:
    from core.merge.methods import all_methods

    methods = all_methods()
    if args.json:
        listing = []
        for m in methods:
            entry = m.to_dict()
            for param, schema in zip(m.parameters, entry["parameters"]):
                schema["range"] = param.range_text()  # the same words as the text listing
            listing.append(entry)
        print(json.dumps(listing, indent=2))
        return 0
    for m in methods:
        base = {"required": "needs a base model", "optional": "base model optional", "ignored": "no base model"}.get(
            m.base, m.base
        )
        print(f"{m.name:<18} {m.display_name} — {m.description} ({base}) {m.paper}")
        for p in m.parameters:
            default = "required" if p.required else f"default {p.default}"
            print(f"    {p.name:<16} {p.kind.__name__:<5} {p.scope:<8} {default:<16} {p.range_text():<14} {p.help}")
    return 0


def _tokens_bench(args: argparse.Namespace) -> int:
    """``mergestudio tokens bench``: see :mod:`core.tokens.bench`."""
    bench_parser = _parser()._tokens_bench  # type: ignore[attr-defined]
    if (args.model is None) == (args.tiny is None):
        bench_parser.error("give a MODEL folder or --tiny vit|bert|unet (exactly one)")
    for name in ("batch", "runs", "resolution", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            bench_parser.error(f"--{name} must be at least 1, got {value}")
    if args.warmup < 0:
        bench_parser.error(f"--warmup must be at least 0, got {args.warmup}")

    from core.tokens import bench, tiny

    options = dict(args.method_options)
    for name in ("r", "ratio", "threshold"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    method, preset = args.method or "tome", None
    if args.preset is not None:
        method, options, preset = _with_preset(args, options, bench_parser)
    if args.model is not None:
        bench.check_folder(args.model)  # before torch loads: a typo fails at once
    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise bench.BenchError("--device cuda: this torch has no CUDA device available.")
        dtype = getattr(torch, args.dtype)
        if args.tiny is not None:
            built = tiny.build(args.tiny, size=args.tiny_size, attn=args.attn)
            loaded = bench.Loaded(bench.move(built.model, device, dtype), built.kind, built.description)
            loaded.notes.extend(built.notes)
            if built.kind == "bert":
                loaded.notes.append("random model without a tokenizer: the sentences' words are hashed to token ids.")
        else:
            loaded = bench.load(args.model, attn=args.attn, dtype=dtype, device=device)
        kind = bench.require_kind(loaded, method, options)
        work = bench.workload(
            loaded.model,
            kind=kind,
            batch=args.batch,
            resolution=args.resolution,
            tokenizer=loaded.tokenizer,
            notes=loaded.notes,
            description=loaded.description,
        )
        result = bench.run(work, method, options, runs=args.runs, warmup=args.warmup)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, the GUI) keep theirs
    if preset is not None:
        result["preset"] = preset
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report = bench.format_text(result).split("\n")
        if preset is not None:  # right under the report's "Method:" line
            at = next((i + 1 for i, line in enumerate(report) if line.startswith("Method:")), len(report))
            report[at:at] = _preset_text(preset).split("\n")
        print("\n".join(report))
    return 0


def _with_preset(args: argparse.Namespace, options: dict, bench_parser: Any) -> tuple[str, dict, dict]:
    """Method and options of ``--preset`` with the command line's on top; and what to report about it."""
    from core.tokens.presets import load_preset, preset_dict, with_overrides

    preset = load_preset(args.preset)  # PresetError: one sentence naming the file and the field
    if args.method is not None and args.method != preset.method:
        bench_parser.error(
            f"--method {args.method} differs from the method of the preset {args.preset} ({preset.method}); "
            "leave --method out or choose another preset"
        )
    merged, overridden = with_overrides(preset, options)
    info = {"path": str(args.preset), "method": preset.method, "options": preset_dict(preset)["options"]}
    return preset.method, merged, {**info, "overridden": overridden}


def _preset_text(preset: dict) -> str:
    """The preset lines of the text report (under its "Method:" line)."""
    shown = ", ".join(f"{k}={v}" for k, v in preset["options"].items()) or "defaults"
    lines = [f"Preset:   {preset['path']} ({preset['method']}: {shown})"]
    for change in preset["overridden"]:
        had = ", ".join(f"{k}={v}" for k, v in change["replaces"].items())
        lines.append(
            f"          {change['option']}={change['value']} from the command line (overrides the preset); "
            f"the preset has {had}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
