"""``mergestudio inspect attention|tokens|diff``: what a model attends to, how it tokenizes, what changed.

    mergestudio inspect attention MODEL --text T [--layers 0,5] [--max-length N] [--save maps.npz] [--json]
    mergestudio inspect attention VIT_MODEL --image IMG [--token-merging R] [--layers ...] [--save ...] [--json]
    mergestudio inspect attention PIPELINE --text PROMPT [--steps N] [--seed S] [--height H] [--width W]
                     [--timesteps 0,1] [--unet-level down|mid|up] [--heads 0,1] [--save maps.npz] [--json]
    mergestudio inspect tokens MODEL... --text T [--premium] [--json]
    mergestudio inspect diff MODEL_A MODEL_B [MODEL...] [--base MODEL] [--top N] [--json]

``attention`` picks the kind from the folder: a diffusers pipeline gives
cross-attention per prompt token, a vision transformer (with ``--image``) CLS
attention and rollout, anything else text attention per layer and head.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from core.errors import MergeStudioError


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer numbers") from None


def add_parser(sub: Any) -> None:
    """Register ``inspect attention|tokens|diff`` on the top-level subparsers."""
    inspect = sub.add_parser("inspect", help="attention maps, token counts and weight differences")
    isub = inspect.add_subparsers(dest="inspect_command", required=True, metavar="attention|tokens|diff")
    hidden = {"action": "store_true", "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}

    att = isub.add_parser("attention", help="attention of a text model, a vision transformer or a diffusion pipeline")
    att.add_argument("model", type=Path, help="model folder (transformers) or diffusers pipeline folder")
    att.add_argument("--text", help="the text (or, for a pipeline, the prompt)")
    att.add_argument("--image", type=Path, help="an image, for a vision transformer")
    att.add_argument("--layers", type=_layers, help="0-based layers to capture, e.g. 0,5 (default: all)")
    att.add_argument("--max-length", type=int, help="cut the text at this many tokens (reported)")
    att.add_argument("--token-merging", type=int, metavar="R", help="vision: ToMe with r tokens merged per layer")
    att.add_argument("--steps", type=int, help="pipeline: denoising steps (default 20)")
    att.add_argument("--seed", type=int, help="pipeline: seed of the noise (default 0)")
    att.add_argument("--height", type=int, help="pipeline: image height (default 512)")
    att.add_argument("--width", type=int, help="pipeline: image width (default 512)")
    att.add_argument("--guidance", type=float, help="pipeline: guidance scale (default 7.5)")
    att.add_argument("--timesteps", type=_layers, help="pipeline: step indices to aggregate (default: all)")
    att.add_argument("--unet-level", choices=("down", "mid", "up"), action="append",
                     help="pipeline: sum the cross-attention of these UNet levels only (repeatable; default all)")
    att.add_argument("--heads", type=_layers, help="pipeline: head indices to sum (default: all)")
    att.add_argument("--save", type=Path, help="write the maps to this .npz file")
    att.add_argument("--device", default="auto")
    att.add_argument("--json", action="store_true")
    att.add_argument("--debug", **hidden)

    tok = isub.add_parser("tokens", help="the same text through each model's tokenizer")
    tok.add_argument("models", nargs="+", type=Path)
    tok.add_argument("--text", help="the text (default with --premium: the parallel text)")
    tok.add_argument("--premium", action="store_true",
                     help="token premium of each language relative to English (UDHR Article 1)")
    tok.add_argument("--json", action="store_true")
    tok.add_argument("--debug", **hidden)

    diff = isub.add_parser("diff", help="per-tensor and per-layer weight differences, streamed")
    diff.add_argument("models", nargs="+", type=Path, metavar="MODEL")
    diff.add_argument("--base", type=Path, help="compare the task vectors (model - base)")
    diff.add_argument("--top", type=int, default=10, help="list the N most changed tensors (default 10)")
    diff.add_argument("--allow-pickle", action="store_true")
    diff.add_argument("--json", action="store_true")
    diff.add_argument("--debug", **hidden)


def _device(name: str) -> str:
    from core.merge.executor import resolve_device

    return resolve_device(name)


def _progress(enabled: bool):
    """A drive() callback printing a one-line progress on stderr (nothing with --json)."""
    if not enabled:
        return None

    def show(p) -> None:
        text = f"{p.message or 'working'}"[:60]
        print(f"\r{text:<60} {p.fraction * 100:5.1f} %", end="", file=sys.stderr, flush=True)

    return show


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    if args.inspect_command == "attention":
        return _attention(args)
    if args.inspect_command == "tokens":
        return _tokens(args)
    return _diff(args)


_PIPELINE_FLAGS = ("steps", "seed", "height", "width", "guidance", "timesteps", "unet_level", "heads")
_FLAGS_OF = {
    "cross-attention": set(_PIPELINE_FLAGS) | {"text"},
    "vision-attention": {"image", "layers", "token_merging"},
    "attention": {"text", "layers", "max_length"},
}
_WHAT = {"cross-attention": "a diffusers pipeline", "vision-attention": "a vision transformer (with --image)",
         "attention": "a text model"}


def _refuse_foreign_flags(kind: str, folder: Path, args: argparse.Namespace) -> None:
    """A flag that does nothing for this kind of model is an error, not silently ignored."""
    for name in ("text", "image", "layers", "max_length", "token_merging", *_PIPELINE_FLAGS):
        if getattr(args, name) is not None and name not in _FLAGS_OF[kind]:
            owners = [k for k, flags in _FLAGS_OF.items() if name in flags]
            flag = "--" + name.replace("_", "-")
            raise MergeStudioError(f"{flag} applies to {' or '.join(_WHAT[k] for k in owners)}; "
                                   f"{folder} is {_WHAT[kind]}.")


def _attention(args: argparse.Namespace) -> int:
    from core.jobs import drive

    folder: Path = args.model
    show = _progress(not args.json)
    kind = ("cross-attention" if (folder / "model_index.json").is_file()
            else "vision-attention" if args.image is not None else "attention")
    _refuse_foreign_flags(kind, folder, args)
    if kind == "cross-attention":
        from core.inspect.cross_attention import iter_cross_attention

        if not args.text:
            raise MergeStudioError(f"{folder} is a diffusers pipeline: give the prompt with --text.")
        def given(value, default):
            return default if value is None else value

        result = drive(iter_cross_attention(
            str(folder), args.text, seed=given(args.seed, 0), steps=given(args.steps, 20),
            height=given(args.height, 512), width=given(args.width, 512), guidance_scale=given(args.guidance, 7.5),
            timesteps=args.timesteps, layers=args.unet_level, heads=args.heads, device=_device(args.device)), show)
    elif kind == "vision-attention":
        from core.inspect.attention import iter_vision_attention

        merging = {"method": "tome", "r": args.token_merging} if args.token_merging else None
        result = drive(iter_vision_attention(str(folder), str(args.image), layers=args.layers,
                                             token_merging=merging, device=_device(args.device)), show)
    else:
        from core.inspect.attention import iter_text_attention

        if not args.text:
            raise MergeStudioError("Give the text to look at with --text (or an image with --image for a ViT).")
        result = drive(iter_text_attention(str(folder), args.text, layers=args.layers, max_length=args.max_length,
                                           device=_device(args.device)), show)
    if show:
        print(file=sys.stderr)
    report = {**result.to_json(include_maps=False), "kind": kind}
    if args.save is not None:
        report["saved"] = str(result.save_npz(args.save))
    if args.json:
        print(json.dumps(_finite(report), indent=2))
        return 0
    print(_attention_text(kind, result, report))
    return 0


def _attention_text(kind: str, result, report: dict) -> str:
    lines = [f"{kind} of {report.get('model') or report.get('pipeline')}"]
    if kind == "attention":
        lines.append(f"  {len(result.tokens)} tokens, layers {result.layers} of {result.num_layers}, "
                     f"{result.heads} heads{' (causal)' if result.causal else ''}")
        avg = result.aggregate()
        for i, token in enumerate(result.tokens[:40]):
            j = int(avg[i].argmax())
            lines.append(f"  {i:>4} {token!s:<16} attends most to {j:>4} {result.tokens[j]!s} ({avg[i, j]:.2f})")
        if len(result.tokens) > 40:
            lines.append(f"  ... {len(result.tokens) - 40} more tokens (use --json or --save)")
    elif kind == "vision-attention":
        gh, gw = result.grid
        lines.append(f"  grid {gh} x {gw}, layers {result.layers} of {result.num_layers}, tokens per layer "
                     f"{result.tokens_per_layer}")
        flat = result.rollout.reshape(-1)
        top = flat.argsort()[::-1][:5]
        lines.append("  rollout peaks at patches " + ", ".join(f"({k // gw}, {k % gw}) {flat[k]:.3f}" for k in top))
    else:
        lines.append(f"  {len(result.tokens)} prompt tokens in {result.chunks} chunk(s), {result.steps} steps, "
                     f"{result.width} x {result.height}")
        for i, token in enumerate(result.tokens):
            lines.append(f"  {i:>4} {token!s:<16} peak {result.raw_max[i]:.4g}")
    for note in getattr(result, "notes", []):
        lines.append(f"  note: {note}")
    if "saved" in report:
        lines.append(f"  maps written to {report['saved']}")
    return "\n".join(lines)


def _tokens(args: argparse.Namespace) -> int:
    from core.inspect import tokenizers

    if args.premium:
        if args.text:
            raise MergeStudioError("--premium counts the parallel text (UDHR Article 1) and takes no --text; "
                                   "leave one of them out.")
        premium = tokenizers.token_premium([str(m) for m in args.models])
        if args.json:
            print(json.dumps(_finite(premium), indent=2))
            return 0
        print(_premium_text(premium))
        return 0
    if not args.text:
        raise MergeStudioError("Give the text to tokenize with --text (or --premium for the parallel text).")
    counts = tokenizers.compare_tokenizers([str(m) for m in args.models], args.text)
    counts = [c for item in counts for c in (item if isinstance(item, list) else [item])]
    if args.json:
        print(json.dumps(_finite({"text": args.text, "tokenizers": [c.to_json() for c in counts]}), indent=2))
        return 0 if any(c.error is None for c in counts) else 1
    for c in counts:
        if c.error is not None:
            print(f"mergestudio: {c.error}", file=sys.stderr)
            continue
        limit = f", limit {c.max_length} ({c.limit_source})" if c.max_length else ""
        print(f"{c.label} [{c.tokenizer}]: {c.count} tokens, {c.chars_per_token:.2f} characters per token{limit}")
        print("  " + " | ".join(c.pieces))
        if c.overflow_token is not None:
            print(f"  beyond the limit from token {c.overflow_token} (character {c.overflow_char}): "
                  f"{c.text[c.overflow_char:]!r}" if c.overflow_char is not None else
                  f"  beyond the limit from token {c.overflow_token}")
    return 0 if any(c.error is None for c in counts) else 1


def _premium_text(premium: dict) -> str:
    """A table: one row per language, one column per tokenizer: tokens (premium relative to English)."""
    from core.inspect.tokenizers import parallel_texts

    texts = parallel_texts()
    models = premium["models"]
    heads = [Path(m["model"]).name + (f"/{m['component']}" if m.get("component") else "") for m in models]
    lines = [f"token premium relative to {premium['reference']} (UDHR Article 1; tokens, premium)",
             f"{'language':<24}" + "".join(f"{h[:22]:>24}" for h in heads)]
    for code in premium["languages"]:
        name = f"{code} {texts.get(code, {}).get('language', '')}"
        cells = []
        for m in models:
            if m.get("error"):
                cells.append(f"{'-':>24}")
                continue
            count, ratio = m["counts"].get(code), m["premium"].get(code)
            unknown = m.get("unknown", {}).get(code) if isinstance(m.get("unknown"), dict) else None
            mark = f" {unknown}unk" if unknown else ""
            cells.append(f"{f'{count} ({ratio:.2f}){mark}':>24}" if count is not None and ratio is not None
                         else f"{'-':>24}")
        lines.append(f"{name[:24]:<24}" + "".join(cells))
    for m in models:
        if m.get("error"):
            lines.append(f"{m['model']}: {m['error']}")
    return "\n".join(lines)


def _diff(args: argparse.Namespace) -> int:
    from core.inspect.weights import iter_weight_diff
    from core.jobs import drive

    show = _progress(not args.json)
    result = drive(iter_weight_diff([str(m) for m in args.models], str(args.base) if args.base else None,
                                    allow_pickle=args.allow_pickle), show)
    if show:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(_finite(result.to_json()), indent=2))
        return 0
    compared = [m for m in result.models if m != result.reference]
    print(f"reference: {result.reference}" + (" (base)" if result.base else ""))
    for i, model in enumerate(compared):
        print(f"{model}:")
        layers = result.per_layer("rel_l2", i)
        if layers:
            print("  relative L2 change per layer: " + ", ".join(f"{layer}: {v:.4f}" for layer, v in layers))
        ranked = sorted(result.tensors, key=lambda t: t.rel_l2[i] if i < len(t.rel_l2) else 0.0, reverse=True)
        for t in ranked[: args.top]:
            print(f"  {t.rel_l2[i]:.5f}  top-10% share {t.top10_share[i]:.2f}  {t.name}")
    conflicts = [t.sign_conflict for t in result.tensors if t.sign_conflict is not None]
    if conflicts:
        print(f"sign conflicts between task vectors: mean {sum(conflicts) / len(conflicts):.3f} over "
              f"{len(conflicts)} tensors")
    for name, reason in result.skipped:
        print(f"skipped {name}: {reason}")
    return 0
