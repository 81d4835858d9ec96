"""The ``mergestudio`` command.

Without a subcommand it opens the desktop app. Subcommands work headless:

    mergestudio merge RECIPE.yaml -o OUT [--device auto|cpu|cuda] [--seed N]
                      [--shard-size 5GB] [--allow-pickle] [--overwrite] [--json]
    mergestudio check RECIPE.yaml [--allow-pickle] [-o OUT] [--json]
    mergestudio methods [--json]

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
        description="Merge Studio: compare and merge models. Without a command, opens the app.",
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if isinstance(args.__dict__.get("shard_size"), str):
        args.shard_size = parse_size(args.shard_size)
    if args.command is None:
        from app.main import main as gui_main

        return gui_main()
    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "check":
            return _check(args)
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


def _merge(args: argparse.Namespace) -> int:
    import core.merge as merge
    from core.jobs import TerminalProgress

    progress = None if args.json else TerminalProgress(sys.stderr)
    try:
        result = merge.run(
            args.recipe,
            args.output,
            device=args.device,
            seed=args.seed,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            on_progress=progress,
        )
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
    return {
        "method": plan.method.name,
        "models": [
            {"ref": m.ref, "path": str(m.source.path), "kind": m.source.kind, "layers": m.layout.count}
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
    }


def _check(args: argparse.Namespace) -> int:
    import core.merge as merge

    plan = merge.check(args.recipe, allow_pickle=args.allow_pickle, output=args.output)
    try:
        info = plan_summary(plan, args.output)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"Recipe {args.recipe}: OK")
        print(f"Method: {plan.method.display_name} ({plan.method.name})  {plan.method.paper}")
        print("Models:")
        for m in info["models"]:
            where = "" if m["path"] == m["ref"] else f"  {m['path']}"
            print(f"  {m['ref']}  [{m['kind']}, {m['layers']} layers]{where}")
        ops = ", ".join(f"{n} {k}" for k, n in info["ops"].items())
        print(f"Plan: {info['tensors']} tensors ({ops}), {info['output_layers']} output layers")
        _print_groups(plan)
        print(f"Output size: {info['output_bytes'] / 1e9:.3f} GB ({', '.join(info['out_dtype'])})")
        print(f"Peak memory (estimate): {info['peak_memory_bytes'] / 1e9:.2f} GB")
        if info["free_disk_bytes"] is not None:
            where = "at the output" if args.output is not None else "in the current folder"
            print(f"Free disk {where}: {info['free_disk_bytes'] / 1e9:.1f} GB")
        for note in plan.notes:
            print(f"Note: {note}")
        return 0
    finally:
        plan.close()


def _print_groups(plan: Any) -> None:
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
    everywhere = _constant_everywhere(values)
    if everywhere:
        print("Parameters (all tensors): " + " ".join(f"{k}={_fmt(v)}" for k, v in everywhere.items()))
    print("Tensor groups:")
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
        print(f"  {key:<50} x{count:<4} {' '.join(parts)}".rstrip())
    if len(shown) > 40:
        print(f"  ... {len(shown) - 40} more groups")


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
