"""``mergestudio models``: find local models and build the demo family.

    mergestudio models scan FOLDER... [--hf-cache] [--max-depth 6] [--json]
    mergestudio models demo [DEST] [--json]

``scan`` prints one line per model (name, architecture, parameters, dtype,
size, provenance, path), then one line per problem; it exits 0 even when some
models are broken, and 1 when a FOLDER does not exist. ``demo`` builds (or
reuses) the demo family and prints the three folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import MergeStudioError

if TYPE_CHECKING:  # pragma: no cover
    from core.io.catalog import ModelInfo
    from core.jobs import Progress


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``models`` and its subcommands to the ``mergestudio`` parser."""
    models = sub.add_parser("models", help="find local models (headers only) and build the demo family")
    models.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="scan|demo")

    scan = models_sub.add_parser(
        "scan",
        help="list the models in folders: architecture, parameters, dtype, size, provenance",
        description="Reads only configs and safetensors headers. Broken models are listed with the reason.",
    )
    scan.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    scan.add_argument("--hf-cache", action="store_true", help="also list the models in the Hugging Face cache")
    scan.add_argument("--max-depth", type=int, default=6, help="folders searched below each FOLDER (default: 6)")
    scan.add_argument("--json", action="store_true", help="print models, problems and a summary as JSON")
    scan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    demo = models_sub.add_parser(
        "demo",
        help="build three tiny random models to try merging with (nothing is downloaded)",
        description="Builds demo-base, demo-chat and demo-code under DEST (reused when already there).",
    )
    demo.add_argument("dest", nargs="?", type=Path, metavar="DEST", help="default: demo-models in the app's folder")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return models


def run(args: argparse.Namespace) -> int:
    """Run ``mergestudio models ...``; MergeStudioError is reported by the caller."""
    if args.models_command == "scan":
        return _scan(args)
    return _demo(args)


def _scan(args: argparse.Namespace) -> int:
    from core.library import human_bytes, human_count, iter_scan

    if args.max_depth < 0:
        raise MergeStudioError(f"--max-depth must be at least 0, got {args.max_depth}.")
    for folder in args.folders:
        if not folder.is_dir():
            reason = "is not a folder" if folder.exists() else "does not exist"
            raise MergeStudioError(f"{folder}: {reason}.")
    work = iter_scan(args.folders, hf_cache=args.hf_cache, max_depth=args.max_depth)
    models, problems = [], []
    try:
        while True:
            batch = next(work)
            models.extend(batch.models)
            problems.extend(batch.problems)
    except StopIteration as stop:
        summary = stop.value
    if args.json:
        print(json.dumps({
            "models": [m.to_dict() for m in models],
            "problems": [p.to_dict() for p in problems],
            "summary": summary.to_dict(),
        }, indent=2))
        return 0
    rows = [
        (
            m.name,
            m.architecture,
            f"{human_count(m.num_parameters)} params",
            m.dtype,
            human_bytes(m.size_bytes),
            _provenance_text(m),
            str(m.path),
        )
        for m in models
    ]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(6)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[6])
    for problem in problems:
        print(f"problem: {' '.join(problem.message.split())}")
    noun = "model" if summary.models == 1 else "models"
    line = f"{summary.models} {noun}, {summary.problems} problem{'s' if summary.problems != 1 else ''}"
    line += f" in {len(summary.roots)} folder{'s' if len(summary.roots) != 1 else ''}"
    if summary.empty_roots:
        line += f"; no models in {', '.join(summary.empty_roots)}"
    print(line + ".")
    return 0


def _provenance_text(info: "ModelInfo") -> str:
    if info.provenance is None:
        return "-"
    return f"{info.provenance.tool}: {info.provenance.detail}"


def _demo(args: argparse.Namespace) -> int:
    from core.demo import iter_make_demo_family
    from core.jobs import drive

    def say(progress: "Progress") -> None:
        if not args.json and sys.stderr.isatty():
            print(f"{progress.message} ({progress.done}/{progress.total})", file=sys.stderr)

    paths = drive(iter_make_demo_family(args.dest), say)
    if args.json:
        print(json.dumps({"models": [str(p) for p in paths]}, indent=2))
    else:
        for path in paths:
            print(path)
    return 0
