"""Self-attention capture for text and vision transformers, and attention rollout.

What is captured
----------------
A forward hook sits on the attention module of every *requested* layer (the modules
transformers itself records for ``output_attentions``, read from the model class's
``_can_record_outputs``). With the eager attention implementation those modules return
their softmax weights ``[B, heads, N, N]`` as the second output; the hook copies batch
row 0 and nothing else, so layers that were not asked for are never held
(``output_attentions=True`` would return every layer). The model runs with eager
attention only for the capture: a folder is loaded with ``attn_implementation="eager"``,
a loaded model is switched with ``set_attn_implementation("eager")`` and switched back
afterwards (``finally``).

Rollout
-------
Attention rollout -- Abnar & Zuidema, "Quantifying Attention Flow in Transformers",
ACL 2020, https://arxiv.org/abs/2005.00928: heads are fused (mean, max or min), the
residual connection is modelled as ``A' = 0.5 * A + 0.5 * I`` with rows renormalised,
and ``R = A'_L @ ... @ A'_1``.

With token merging (ToMe -- Bolya et al., "Token Merging: Your ViT But Faster", ICLR
2023, https://arxiv.org/abs/2210.09461) the token count shrinks after every layer;
:func:`merged_rollout` carries ``R [N_l, N_0]`` (current tokens x input tokens) through
each merge by combining the rows of merged tokens with a size-weighted mean, the same
average ToMe applies to the features.

Shapes: ``N`` tokens, ``heads`` attention heads, ``gh x gw`` the patch grid. Importing
this module is cheap: numpy, torch, transformers and Pillow load inside functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import MergeStudioError
from core.jobs import Progress, drive

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

__all__ = [
    "AttentionError",
    "AttentionRecorder",
    "TextAttention",
    "VisionAttention",
    "attention_modules",
    "attention_rollout",
    "iter_text_attention",
    "iter_vision_attention",
    "merge_matrices",
    "merged_rollout",
    "text_attention",
    "vision_attention",
]

HEAD_FUSIONS = ("mean", "max", "min")
AGGREGATIONS = ("mean", "max")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
# Anything at or above this is transformers' "no limit" sentinel for model_max_length.
_NO_LIMIT = 10**7


class AttentionError(MergeStudioError):
    """Attention cannot be captured: the model, its tokenizer, the input or an option (one sentence)."""


# --------------------------------------------------------------------------- results


def _atomic_npz(path, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` (.npz) through a temporary file in the same folder, then rename."""
    import numpy as np

    target = Path(path)
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)  # a file object: numpy adds no suffix of its own
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _plain(value):
    """``value`` with tuples as lists and anything exotic as its repr (for JSON)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


@dataclass
class TextAttention:
    """Self-attention of one text through a text model.

    ``maps[layer]`` is float32 ``[heads, N, N]``: row ``i`` is query token ``i``'s
    attention over the key tokens, each row sums to 1 (for decoders, entries above the
    diagonal are 0).
    """

    model: str
    text: str
    tokens: list[str]
    layers: list[int]
    num_layers: int
    heads: int
    maps: dict[int, np.ndarray]
    causal: bool
    truncated: bool
    notes: list[str] = field(default_factory=list)

    def aggregate(
        self, layers: list[int] | None = None, heads: list[int] | None = None, how: str = "mean"
    ) -> np.ndarray:
        """Maps of ``layers`` x ``heads`` (default: all captured) reduced to one float32 ``[N, N]``.

        ``how``: ``"mean"`` or ``"max"`` over the chosen (layer, head) maps.
        """
        import numpy as np

        if how not in AGGREGATIONS:
            raise AttentionError(f"how={how!r} is not an aggregation; use one of {', '.join(AGGREGATIONS)}.")
        chosen = list(self.layers) if layers is None else list(layers)
        if not chosen:
            raise AttentionError("aggregate needs at least one layer.")
        for layer in chosen:
            if layer not in self.maps:
                raise AttentionError(
                    f"layer {layer!r} was not captured; captured layers: {', '.join(map(str, self.layers))}."
                )
        picked = list(range(self.heads)) if heads is None else list(heads)
        if not picked:
            raise AttentionError("aggregate needs at least one head.")
        for head in picked:
            if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.heads:
                raise AttentionError(f"head {head!r} is out of range; the model has heads 0..{self.heads - 1}.")
        stack = np.concatenate([self.maps[layer][picked] for layer in chosen], axis=0)  # [layers*heads, N, N]
        out = stack.mean(axis=0) if how == "mean" else stack.max(axis=0)
        return out.astype(np.float32)

    def meta(self) -> dict:
        """Everything but the maps, JSON-ready."""
        return {
            "kind": "text_attention",
            "model": self.model,
            "text": self.text,
            "tokens": list(self.tokens),
            "layers": list(self.layers),
            "num_layers": self.num_layers,
            "heads": self.heads,
            "causal": self.causal,
            "truncated": self.truncated,
            "notes": list(self.notes),
        }

    def to_json(self, include_maps: bool = False) -> dict:
        """A JSON-ready dict; ``include_maps`` adds ``maps`` as ``{"<layer>": [heads][N][N]}`` nested lists."""
        out = self.meta()
        if include_maps:
            out["maps"] = {str(layer): self.maps[layer].tolist() for layer in self.layers}
        return out

    def save_npz(self, path) -> Path:
        """``layer_<i>`` arrays ``[heads, N, N]``, ``tokens`` (str array) and ``meta`` (JSON string); atomic."""
        import numpy as np

        arrays = {f"layer_{layer}": self.maps[layer] for layer in self.layers}
        arrays["tokens"] = np.array(self.tokens, dtype=str)
        arrays["meta"] = np.array(json.dumps(self.meta()))
        return _atomic_npz(path, arrays)


@dataclass
class VisionAttention:
    """Attention of one image through a vision transformer.

    ``cls_attention[layer]`` is float32 ``[heads, gh, gw]``: the class token's attention
    to every patch (with token merging: a merged token's weight divided evenly over the
    patches it covers). ``rollout`` is float32 ``[gh, gw]``, the class token's row of
    attention rollout restricted to the patches. ``groups [gh, gw]`` (token merging
    only) is the index, in the encoder's output sequence, of the token each patch ended
    up in. ``tokens_per_layer`` counts the tokens entering each layer; ``output_tokens``
    those leaving the last one; ``special_tokens`` the leading non-patch tokens.
    """

    model: str
    image: np.ndarray
    grid: tuple[int, int]
    layers: list[int]
    num_layers: int
    heads: int
    cls_attention: dict[int, np.ndarray]
    rollout: np.ndarray
    groups: np.ndarray | None
    tokens_per_layer: list[int]
    token_merging: dict | None
    notes: list[str] = field(default_factory=list)
    output_tokens: int = 0
    special_tokens: int = 1
    head_fusion: str = "mean"

    def meta(self) -> dict:
        """Everything but the arrays, JSON-ready."""
        return {
            "kind": "vision_attention",
            "model": self.model,
            "image_shape": list(self.image.shape),
            "grid": list(self.grid),
            "layers": list(self.layers),
            "num_layers": self.num_layers,
            "heads": self.heads,
            "tokens_per_layer": list(self.tokens_per_layer),
            "output_tokens": self.output_tokens,
            "special_tokens": self.special_tokens,
            "head_fusion": self.head_fusion,
            "token_merging": _plain(self.token_merging),
            "notes": list(self.notes),
        }

    def to_json(self, include_maps: bool = False) -> dict:
        """A JSON-ready dict; ``include_maps`` adds ``cls_attention``, ``rollout`` and ``groups`` as nested lists."""
        out = self.meta()
        if include_maps:
            out["cls_attention"] = {str(layer): self.cls_attention[layer].tolist() for layer in self.layers}
            out["rollout"] = self.rollout.tolist()
            out["groups"] = None if self.groups is None else self.groups.tolist()
        return out

    def save_npz(self, path) -> Path:
        """``image``, ``cls_<i>`` ``[heads, gh, gw]``, ``rollout``, ``groups`` (if any), ``meta`` (JSON); atomic."""
        import numpy as np

        arrays = {"image": self.image, "rollout": self.rollout}
        arrays.update({f"cls_{layer}": self.cls_attention[layer] for layer in self.layers})
        if self.groups is not None:
            arrays["groups"] = self.groups
        arrays["meta"] = np.array(json.dumps(self.meta()))
        return _atomic_npz(path, arrays)


# --------------------------------------------------------------------------- rollout


def _fuse(attention, head_fusion: str):
    """``[heads, N, N] -> [N, N]`` float64 by mean, max or min over heads."""
    import numpy as np

    if head_fusion not in HEAD_FUSIONS:
        raise AttentionError(f"head_fusion={head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}.")
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise AttentionError(f"an attention map must be [heads, N, N], got shape {list(a.shape)}.")
    return {"mean": a.mean, "max": a.max, "min": a.min}[head_fusion](axis=0)


def _with_residual(a, residual: bool):
    """``A' = 0.5 A + 0.5 I`` (when ``residual``), rows renormalised to sum to 1."""
    import numpy as np

    if residual:
        a = 0.5 * a + 0.5 * np.eye(a.shape[0])
    sums = a.sum(axis=-1, keepdims=True)
    return a / np.where(sums > 0, sums, 1.0)


def attention_rollout(
    maps: Sequence[np.ndarray], *, head_fusion: str = "mean", residual: bool = True
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928).

    ``maps[l]``: ``[heads, N, N]`` of layer ``l`` (first layer first). Heads are fused
    (``mean|max|min``), ``A' = 0.5 A + 0.5 I`` models the residual stream (skipped when
    ``residual=False``), rows are renormalised, and ``R = A'_L @ ... @ A'_1``. Returns
    float32 ``[N, N]``: row ``i`` = how much output token ``i`` draws on each input token.
    """
    import numpy as np

    maps = list(maps)
    if not maps:
        raise AttentionError("attention rollout needs at least one layer's attention map.")
    rollout = None
    for index, attention in enumerate(maps):
        a = _with_residual(_fuse(attention, head_fusion), residual)
        if rollout is None:
            rollout = np.eye(a.shape[0])
        if a.shape[1] != rollout.shape[0]:
            raise AttentionError(
                f"layer {index}'s attention map is over {a.shape[1]} tokens but layer 0's over {rollout.shape[0]}; "
                "use merged_rollout when tokens are merged."
            )
        rollout = a @ rollout
    return rollout.astype(np.float32)


def merged_rollout(
    maps: Sequence[np.ndarray],
    merges: Sequence[np.ndarray | None],
    *,
    head_fusion: str = "mean",
    residual: bool = True,
) -> np.ndarray:
    """Attention rollout through layers whose token count shrinks (ToMe, https://arxiv.org/abs/2210.09461).

    ``maps[l]``: ``[heads, N_l, N_l]``, the attention of layer ``l`` over the tokens
    entering it. ``merges[l]``: the 0/1 matrix ``M_l [N_{l+1}, N_l]`` of the merge after
    layer ``l`` (``M_l[k, j] = 1`` when token ``j`` went into token ``k``; every column
    has exactly one 1), or None for no merge (the identity). Exactly::

        R = I [N_0, N_0];  s = ones(N_0)               # s: input tokens each token covers
        for each layer l:
            A' = rownorm(0.5 * fuse(maps[l]) + 0.5 * I)    # rownorm(fuse(maps[l])) without residual
            R  = A' @ R                                      # [N_l, N_0]
            R  = diag(1 / (M_l s)) @ M_l @ diag(s) @ R       # [N_{l+1}, N_0]: size-weighted mean of merged rows
            s  = M_l s

    so every row still sums to 1. Returns float32 ``[N_L, N_0]`` (tokens leaving the
    last layer x input tokens). :func:`merge_matrices` builds ``merges`` from
    ``handle.layer_assignments``.
    """
    import numpy as np

    maps, merges = list(maps), list(merges)
    if not maps:
        raise AttentionError("attention rollout needs at least one layer's attention map.")
    if len(merges) != len(maps):
        raise AttentionError(
            f"merged_rollout got {len(maps)} attention maps but {len(merges)} merges; give one per layer."
        )
    rollout = size = None
    for index, (attention, merge) in enumerate(zip(maps, merges)):
        a = _with_residual(_fuse(attention, head_fusion), residual)
        if rollout is None:
            rollout, size = np.eye(a.shape[0]), np.ones(a.shape[0])
        if a.shape[1] != rollout.shape[0]:
            raise AttentionError(
                f"layer {index}'s attention map is over {a.shape[1]} tokens but {rollout.shape[0]} tokens enter it."
            )
        rollout = a @ rollout
        if merge is None:
            continue
        m = np.asarray(merge, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != rollout.shape[0] or not np.array_equal(m.sum(axis=0), np.ones(m.shape[1])):
            raise AttentionError(
                f"merge {index} must be a 0/1 matrix [N_out, {rollout.shape[0]}] with one 1 per column, "
                f"got shape {list(m.shape)}."
            )
        new_size = m @ size
        if (new_size <= 0).any():
            raise AttentionError(f"merge {index} has an output token that no token went into.")
        rollout = (m * size[None, :]) @ rollout / new_size[:, None]
        size = new_size
    return rollout.astype(np.float32)


def merge_matrices(layer_assignments: Sequence, tokens: Sequence[int]) -> list[np.ndarray | None]:
    """Per-layer merge matrices ``M_l [N_{l+1}, N_l]`` from per-layer assignments.

    ``layer_assignments[l]``: ``[N_0]`` ints (or None before the first merge, the
    identity), the token that covers each input token after layer ``l``'s merge, as
    :attr:`core.tokens.api.TokenMergeHandle.layer_assignments` gives them for one
    sample. ``tokens``: ``N_0 .. N_L`` (tokens entering each layer, then leaving the
    last), ``len(layer_assignments) + 1`` numbers. ``M_l[a_l[i], a_{l-1}[i]] = 1`` for
    every input token ``i``; None where the layer merged nothing.
    """
    import numpy as np

    tokens = [int(t) for t in tokens]
    if len(tokens) != len(layer_assignments) + 1:
        raise AttentionError(
            f"merge_matrices needs {len(layer_assignments) + 1} token counts for {len(layer_assignments)} layers, "
            f"got {len(tokens)}."
        )
    n_input = tokens[0]
    previous = np.arange(n_input)
    out: list[np.ndarray | None] = []
    for index, assignment in enumerate(layer_assignments):
        current = previous if assignment is None else _numpy(assignment).astype(np.int64).reshape(-1)
        if current.shape != (n_input,):
            raise AttentionError(f"assignment {index} covers {current.size} input tokens, expected {n_input}.")
        n_in, n_out = tokens[index], tokens[index + 1]
        if n_in == n_out and np.array_equal(current, previous):
            out.append(None)
        else:
            if current.max(initial=-1) >= n_out or previous.max(initial=-1) >= n_in:
                raise AttentionError(f"assignment {index} points past the {n_out} tokens leaving layer {index}.")
            m = np.zeros((n_out, n_in))
            m[current, previous] = 1.0
            if not np.array_equal(m.sum(axis=0), np.ones(n_in)):
                raise AttentionError(f"assignment {index} splits a token of layer {index} over several merged tokens.")
            out.append(m)
        previous = current
    return out


def _numpy(tensor):
    """A torch tensor (any device) or array as a numpy array."""
    import numpy as np

    if hasattr(tensor, "detach"):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


# --------------------------------------------------------------------------- attention modules


def _recorder_specs(model) -> list[tuple[Any, Any, Any, int]]:
    """``(target_class, class_name, layer_name, index)`` of every ``"attentions"`` recorder in the model."""
    specs = []
    for module in model.modules():
        table = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(table, dict) or "attentions" not in table:
            continue
        entries = table["attentions"] if isinstance(table["attentions"], list) else [table["attentions"]]
        for entry in entries:
            if isinstance(entry, type):
                spec = (entry, None, None, 1)
            elif isinstance(entry, str):
                spec = (None, entry, None, 1)
            else:  # transformers' OutputRecorder
                spec = (
                    getattr(entry, "target_class", None),
                    getattr(entry, "class_name", None),
                    getattr(entry, "layer_name", None),
                    int(getattr(entry, "index", 1)),
                )
            if spec not in specs:
                specs.append(spec)
    return specs


def attention_modules(model) -> list[tuple[str, Any, int]]:
    """The self-attention modules of a transformers model, in layer order: ``(name, module, output_index)``.

    They are the modules transformers records for ``output_attentions`` (the model
    class's ``_can_record_outputs["attentions"]``, matched the way transformers matches
    them); ``output_index`` is where their output tuple holds the weights. Empty when
    the model declares none.
    """
    specs = _recorder_specs(model)
    found: list[tuple[str, Any, int]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        for target_class, class_name, layer_name, index in specs:
            matches = (target_class is not None and isinstance(module, target_class)) or (
                class_name is not None and f".{name}".endswith(class_name)
            )
            if matches and layer_name is not None and f".{layer_name.strip('.')}." not in f".{name}.":
                matches = False
            if matches and id(module) not in seen:
                seen.add(id(module))
                found.append((name, module, index))
                break
    return found


class AttentionRecorder:
    """Forward hooks that keep the attention weights of chosen layers only.

    ``modules``: :func:`attention_modules` of a model; ``layers``: the layer indices to
    keep in full (batch row 0, float32 ``[heads, N, N]`` numpy arrays in :attr:`maps`).
    ``reduce`` (optional) maps a layer's ``[heads, N, N]`` tensor to something small
    that is kept for *every* layer in :attr:`reduced` (the head-fused map rollout
    needs). Without ``reduce`` only the chosen layers carry a hook
    (:attr:`hooked_layers`). A module that returns no weights (SDPA or flash
    attention) is listed in :attr:`missing`. Use as a context manager, or call
    :meth:`remove`.
    """

    def __init__(self, modules: list[tuple[str, Any, int]], layers: Sequence[int], reduce=None):
        self.modules = modules
        self.layers = sorted(set(layers))
        self.reduce = reduce
        self.maps: dict[int, Any] = {}
        self.reduced: dict[int, Any] = {}
        self.missing: list[int] = []
        self.hooked_layers = list(range(len(modules))) if reduce is not None else list(self.layers)
        self._hooks: list = []
        try:
            for layer in self.hooked_layers:
                _, module, index = modules[layer]
                self._hooks.append(module.register_forward_hook(self._hook(layer, index)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, layer: int, index: int):
        keep = layer in self.layers

        def hook(module, args, output):
            weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if weights is None or not hasattr(weights, "dim") or weights.dim() != 4:
                if layer not in self.missing:
                    self.missing.append(layer)
                return
            row = weights[0].detach().float()  # [heads, N, N]: batch row 0 only
            if keep:
                self.maps[layer] = row.cpu().numpy()
            if self.reduce is not None:
                self.reduced[layer] = self.reduce(row)

        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _num_layers_of(model, modules: list, where: str) -> int:
    """How many attention layers; the config's count must agree with the modules found."""
    if not modules:
        raise AttentionError(
            f"{where}: no self-attention modules found in this {type(model).__name__}, so it cannot return "
            "attention maps (transformers models that record output_attentions are supported)."
        )
    config = getattr(model, "config", None)
    declared = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            declared = value
            break
    if declared is not None and declared != len(modules):
        raise AttentionError(
            f"{where}: found {len(modules)} self-attention modules but the config declares {declared} layers; "
            "this architecture's attention layout is not supported."
        )
    return len(modules)


def _check_layers(layers, num_layers: int) -> list[int]:
    """Requested layer indices, validated and sorted (None: all)."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence):
        raise AttentionError(f"layers={layers!r} must be a list of layer indices 0..{num_layers - 1}.")
    if not layers:
        raise AttentionError(f"layers is empty; give at least one layer index in 0..{num_layers - 1}.")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise AttentionError(
                f"layer index {layer!r} is out of range; this model has {num_layers} layers (0..{num_layers - 1})."
            )
    return sorted(set(layers))


class _Eager:
    """Context manager: the model runs eager attention (and eval mode) inside, as it was outside."""

    def __init__(self, model):
        self.model = model
        self.previous = None
        self.training = False

    def __enter__(self):
        config = getattr(self.model, "config", None)
        self.previous = getattr(config, "_attn_implementation", None)
        self.training = bool(getattr(self.model, "training", False))
        if self.previous not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            from core.tokens.lab import _quiet_libraries

            with _quiet_libraries():
                try:
                    self.model.set_attn_implementation("eager")
                except Exception:  # noqa: BLE001 - it cannot switch: the capture then reports missing weights
                    pass
        if self.training:
            self.model.eval()  # attention dropout would make the maps random
        return self

    def __exit__(self, *exc) -> None:
        config = getattr(self.model, "config", None)
        if self.previous is not None and getattr(config, "_attn_implementation", None) != self.previous:
            self.model.set_attn_implementation(self.previous)
        if self.training:
            self.model.train()


# --------------------------------------------------------------------------- loading


def _short(error: BaseException) -> str:
    from core.tokens.bench import _short

    return _short(error, 200)


def _config_json(folder: Path) -> dict:
    """The folder's config.json, or one sentence on why it is not a transformers model folder."""
    from core.tokens.bench import _read_json

    if not folder.exists():
        raise AttentionError(f"model folder {folder} does not exist.")
    if not folder.is_dir():
        raise AttentionError(f"{folder} is not a folder; attention capture takes a Hugging Face model folder.")
    if (folder / "model_index.json").is_file():
        raise AttentionError(
            f"{folder} is a diffusers pipeline; attention capture here takes transformers text and vision models."
        )
    path = folder / "config.json"
    if not path.is_file():
        raise AttentionError(f"{folder} has no config.json; it is not a Hugging Face model folder.")
    try:
        config = _read_json(path)
    except MergeStudioError as error:
        raise AttentionError(str(error)) from None
    if "_class_name" in config:
        raise AttentionError(
            f"{folder} is a diffusers {config['_class_name']}; attention capture here takes transformers models."
        )
    if "model_type" not in config:
        raise AttentionError(f"{path} has no model_type; it is not a Hugging Face transformers model folder.")
    return config


def _load_model(folder: Path, device: str):
    """``AutoModel.from_pretrained(folder)``: eager attention, safetensors only, no log noise, eval mode."""
    from core.tokens.bench import _require_safetensors
    from core.tokens.lab import _quiet_libraries

    try:
        _require_safetensors(folder)
    except MergeStudioError as error:
        raise AttentionError(str(error)) from None
    import transformers

    with _quiet_libraries():
        try:
            model = transformers.AutoModel.from_pretrained(
                str(folder), attn_implementation="eager", use_safetensors=True
            )
        except Exception as error:  # transformers' messages span lines: one line of it
            raise AttentionError(f"could not load {folder} with eager attention: {_short(error)}") from None
        try:
            model = model.to(device)
        except Exception as error:
            raise AttentionError(f"could not move {folder} to device {device!r}: {_short(error)}") from None
    return model.eval()


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise AttentionError(f"{folder} has no tokenizer (no tokenizer.json, vocabulary or tokenizer_config.json).")
    from transformers import AutoTokenizer

    from core.tokens.lab import _quiet_libraries

    with _quiet_libraries():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:
            raise AttentionError(f"could not load the tokenizer of {folder}: {_short(error)}") from None


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def _unpack(model, what: str):
    """``model`` as ``(folder or None, module, companion)``: a path, a loaded module, or a (module, companion) pair."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model).expanduser(), None, None  # "~/m/bert" as the README writes it
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise AttentionError(f"a loaded model is given as (model, {what}); got {len(model)} items.")
        return None, model[0], model[1]
    return None, model, None


def _device_of(model):
    import torch

    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _device_note(module, device: str) -> list[str]:
    import torch

    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        raise AttentionError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1').") from None
    actual = _device_of(module)
    if actual.type != wanted.type or (wanted.index is not None and actual.index != wanted.index):
        return [f"the loaded model ran on {actual}, where it is (device={device!r} applies to folders)."]
    return []


# --------------------------------------------------------------------------- text


def _max_tokens(model, tokenizer) -> int | None:
    """The longest input the model takes: the tokenizer's limit and the position table, whichever is less."""
    limits = []
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        limits.append(limit)
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else None


def _is_causal(model, modules) -> bool:
    """Decoder (masked) self-attention: the modules' own ``is_causal`` flags, else the config's ``is_decoder``."""
    flags = [getattr(module, "is_causal", None) for _, module, _ in modules]
    if any(flag is True for flag in flags):
        return True
    if flags and all(flag is False for flag in flags):
        return False
    return bool(getattr(model.config, "is_decoder", False))


def _accepts(module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _cut_note(tokenizer, text: str, full: list[int], kept: list[int], limit: int) -> str:
    """Where the text was cut, in words (with the character offset when the tokenizer gives offsets)."""
    where = ""
    try:
        offsets = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True)["offset_mapping"]
        end = max((stop for start, stop in offsets if stop > start), default=0)
        if 0 < end < len(text):
            tail = " ".join(text[max(0, end - 30) : end].split())
            where = f", cut at character {end} of {len(text)} (after '...{tail}')"
    except Exception:  # noqa: BLE001 - slow tokenizers have no offsets; the counts still say it
        where = ""
    return (
        f"the text is {len(full)} tokens long, more than the limit of {limit}: only the first {len(kept)} tokens "
        f"were used{where}."
    )


def iter_text_attention(
    model,
    text: str,
    *,
    layers: list[int] | None = None,
    max_length: int | None = None,
    device: str = "cpu",
) -> Generator[Progress, None, TextAttention]:
    """Capture the self-attention of ``text``; yields :class:`Progress`, returns :class:`TextAttention`.

    ``model``: a local Hugging Face folder (an encoder like BERT or a decoder like
    Llama/GPT-2; loaded with eager attention on ``device``) or a loaded
    ``(model, tokenizer)`` pair (run where it is; switched to eager attention for the
    capture and back). ``layers``: 0-based layer indices (default all); only those
    layers' maps are ever held. ``max_length``: cut the text to this many tokens
    (default and upper bound: the model's own maximum); a cut sets ``truncated`` and
    is explained in ``notes``.
    """
    import torch

    if not isinstance(text, str) or not text.strip():
        raise AttentionError("the text is empty; type a sentence to capture its attention.")
    folder, module, tokenizer = _unpack(model, "tokenizer")
    total = 4
    notes: list[str] = []
    if folder is not None:
        _config_json(folder)
        tokenizer = _load_tokenizer(folder)  # before the weights: a missing tokenizer fails fast
        yield Progress(0, total, message=f"loading {folder.name}")
        module = _load_model(folder, device)
        name = str(folder)
    else:
        name = _model_name(module)
        if tokenizer is None:
            raise AttentionError(f"{name} was given without a tokenizer; pass (model, tokenizer).")
        notes.extend(_device_note(module, device))
    modules = attention_modules(module)
    num_layers = _num_layers_of(module, modules, name)
    chosen = _check_layers(layers, num_layers)

    yield Progress(1, total, message="tokenizing")
    limit = _max_tokens(module, tokenizer)
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise AttentionError(f"max_length={max_length!r} must be a whole number of tokens, at least 1.")
        if limit is not None and max_length > limit:
            raise AttentionError(f"max_length={max_length} is more than the {limit} tokens {name} accepts.")
        limit = max_length
    from core.tokens.lab import _quiet_libraries

    with _quiet_libraries():  # no "sequence is longer than the maximum" warning: the note says it
        full = tokenizer(text)["input_ids"]
        truncated = limit is not None and len(full) > limit
        if truncated:
            encoded = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")
        else:
            encoded = tokenizer(text, return_tensors="pt")
    ids = encoded["input_ids"]
    if ids.shape[1] == 0:
        raise AttentionError(f"the tokenizer of {name} turned the text into no tokens.")
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    if truncated:
        notes.append(_cut_note(tokenizer, text, full, ids[0].tolist(), limit))

    yield Progress(2, total, message=f"running {len(tokens)} tokens through {num_layers} layers")
    target = _device_of(module)
    inputs = {"input_ids": ids.to(target)}
    if "attention_mask" in encoded:
        inputs["attention_mask"] = encoded["attention_mask"].to(target)
    kwargs = {"use_cache": False} if _accepts(module, "use_cache") else {}
    with _Eager(module), AttentionRecorder(modules, chosen) as recorder, torch.no_grad():
        module(**inputs, **kwargs)
    if recorder.missing or set(recorder.maps) != set(chosen):
        impl = getattr(module.config, "_attn_implementation", None)
        raise AttentionError(
            f"{name} did not return attention weights (layers {', '.join(map(str, recorder.missing or chosen))}): "
            f"its attention implementation {impl!r} computes them inside a fused kernel and could not switch to eager."
        )
    yield Progress(3, total, message="collecting maps")
    maps = {layer: recorder.maps[layer].astype("float32") for layer in chosen}
    result = TextAttention(
        model=name,
        text=text,
        tokens=tokens,
        layers=chosen,
        num_layers=num_layers,
        heads=int(maps[chosen[0]].shape[0]),
        maps=maps,
        causal=_is_causal(module, modules),
        truncated=truncated,
        notes=notes,
    )
    yield Progress(4, total, message="done")
    return result


def text_attention(model, text: str, **kw) -> TextAttention:
    """:func:`iter_text_attention` run to the end (``core.jobs.drive``)."""
    return drive(iter_text_attention(model, text, **kw))


# --------------------------------------------------------------------------- vision

# Leading non-patch tokens per supported class: CLS (DeiT: CLS and distillation).
_VISION_FAMILIES = {
    "ViTModel": 1,
    "ViTForImageClassification": 1,
    "DeiTModel": 2,
    "DeiTForImageClassification": 2,
    "DeiTForImageClassificationWithTeacher": 2,
}
_VISION_TYPES = ("vit", "deit")


def _vision_specials(model, name: str) -> int:
    """Leading non-patch tokens of a supported ViT/DeiT; a one-sentence error for other models."""
    for cls in type(model).__mro__:
        if cls.__name__ in _VISION_FAMILIES:
            return _VISION_FAMILIES[cls.__name__]
    raise AttentionError(
        f"{name} is a {type(model).__name__}; vision attention supports {', '.join(_VISION_FAMILIES)}."
    )


def _image_size(config, name: str) -> tuple[int, int]:
    """``(size, patch)`` of a square ViT/DeiT config."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if isinstance(patch, (list, tuple)):
        patch = patch[0] if len(set(patch)) == 1 else None
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0 or size % patch:
        raise AttentionError(
            f"{name}: image_size={getattr(config, 'image_size', None)!r} and patch_size="
            f"{getattr(config, 'patch_size', None)!r} must be one number each, the size a multiple of the patch."
        )
    channels = int(getattr(config, "num_channels", 3))
    if channels != 3:
        raise AttentionError(f"{name} expects images with {channels} channels; attention capture feeds RGB pictures.")
    return size, patch


def _preprocess_settings(folder: Path | None, processor, notes: list[str]):
    """Mean, std and resampling filter: the processor's, the folder's preprocessor_config.json, or 0.5/0.5."""
    from core.tokens.lab import _preprocessing

    if processor is not None:
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        resample = getattr(processor, "resample", None)
        resample = int(resample) if resample is not None else None
        if mean is not None and std is not None:
            mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
            std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
            return mean, std, resample
    if folder is not None and folder.is_dir():
        mean, std, resample, extra = _preprocessing(folder, 3)
        notes.extend(extra)
        return mean, std, resample
    notes.append("no image processor was given: pixels are normalised with mean 0.5 and std 0.5.")
    return [0.5] * 3, [0.5] * 3, None


def _as_image(image, size: int, resample: int | None):
    """``image`` (path, PIL image or uint8 array) as RGB uint8 ``[size, size, 3]``: scaled to cover, center-cropped."""
    import numpy as np
    from PIL import Image, ImageOps

    from core.tokens.lab import _read_image

    if isinstance(image, (str, os.PathLike)):
        return _read_image(Path(image).expanduser(), size, resample)  # LabError (a MergeStudioError) naming the file
    if isinstance(image, Image.Image):
        picture = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise AttentionError(f"an image array must be uint8 [H, W, 3] (or [H, W]); got dtype {array.dtype}.")
        if array.ndim == 3 and array.shape[2] in (3, 4):
            picture = Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")
        elif array.ndim == 2:
            picture = Image.fromarray(np.ascontiguousarray(array), "L").convert("RGB")
        else:
            raise AttentionError(f"an image array must be [H, W, 3] or [H, W]; got shape {list(array.shape)}.")
    method = Image.Resampling(resample) if resample is not None else Image.Resampling.BICUBIC
    fitted = ImageOps.fit(picture, (size, size), method=method, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8).copy()


def iter_vision_attention(
    model,
    image,
    *,
    layers: list[int] | None = None,
    token_merging: dict | None = None,
    head_fusion: str = "mean",
    device: str = "cpu",
) -> Generator[Progress, None, VisionAttention]:
    """Capture a ViT/DeiT's attention on ``image``; yields :class:`Progress`, returns :class:`VisionAttention`.

    ``model``: a local ViT/DeiT folder (loaded with eager attention on ``device``), a
    loaded model, or ``(model, image_processor)`` (its mean/std/resample are used).
    ``image``: a path, a PIL image or a uint8 array, fitted to the model's size as the
    folder's ``preprocessor_config.json`` says. ``layers``: where to keep the class
    token's attention (default all; the rollout always uses every layer, head-fused
    by ``head_fusion``). ``token_merging``: options for :func:`core.tokens.apply`
    (e.g. ``{"method": "tome", "r": 2}``), applied for this one forward with
    ``trace_source=True`` and always removed afterwards.
    """
    import numpy as np
    import torch

    if head_fusion not in HEAD_FUSIONS:
        raise AttentionError(f"head_fusion={head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}.")
    if token_merging is not None and not isinstance(token_merging, dict):
        raise AttentionError(
            f"token_merging={token_merging!r} must be a dict of options, e.g. {{'method': 'tome', 'r': 8}}."
        )
    folder, module, processor = _unpack(model, "image processor")
    total = 5
    notes: list[str] = []
    if folder is not None:
        config = _config_json(folder)
        if config.get("model_type") not in _VISION_TYPES:
            raise AttentionError(
                f"{folder} is a {config.get('model_type')!r} model; vision attention supports ViT and DeiT folders."
            )
        yield Progress(0, total, message=f"loading {folder.name}")
        module = _load_model(folder, device)
        name = str(folder)
    else:
        name = _model_name(module)
        folder = Path(name) if Path(name).is_dir() else None  # its preprocessor_config.json, when known
        notes.extend(_device_note(module, device))
    specials = _vision_specials(module, name)
    size, patch = _image_size(module.config, name)
    grid = (size // patch, size // patch)
    modules = attention_modules(module)
    num_layers = _num_layers_of(module, modules, name)
    chosen = _check_layers(layers, num_layers)

    yield Progress(1, total, message="preparing the image")
    mean, std, resample = _preprocess_settings(folder, processor, notes)
    shown = _as_image(image, size, resample)  # [size, size, 3] uint8
    pixels = (shown.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    pixel_values = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None].to(_device_of(module))  # [1, 3, H, W]

    yield Progress(2, total, message=f"running the image through {num_layers} layers")
    fuse = {"mean": lambda a: a.mean(0), "max": lambda a: a.amax(0), "min": lambda a: a.amin(0)}[head_fusion]

    def reduce(row):  # [heads, N_l, N_l] -> the head-fused [N_l, N_l] rollout needs, kept for every layer
        return fuse(row).cpu().numpy().astype(np.float64)

    handle = None
    assignments: list = [None] * num_layers
    tokens_per_layer: list[int] = []
    output_tokens = 0
    with _Eager(module):
        try:
            if token_merging is not None:
                options = dict(token_merging)
                method = options.pop("method", "tome")
                if options.get("trace_source") is False:
                    notes.append("token_merging: trace_source=False was overridden; the capture needs the sources.")
                options["trace_source"] = True
                from core.tokens import apply

                handle = apply(module, method=method, **options)
            with AttentionRecorder(modules, chosen, reduce=reduce) as recorder, torch.no_grad():
                module(pixel_values=pixel_values)
            if handle is not None:
                stats = handle.stats
                assignments = [None if a is None else _numpy(a[0]).astype(np.int64) for a in handle.layer_assignments]
                tokens_per_layer = [int(t) for t in stats["tokens_per_layer"]]
                output_tokens = int(stats["output_tokens"])
        finally:
            if handle is not None:
                handle.remove()
    if recorder.missing or len(recorder.reduced) != num_layers:
        impl = getattr(module.config, "_attn_implementation", None)
        raise AttentionError(
            f"{name} did not return attention weights: its attention implementation {impl!r} computes them inside "
            "a fused kernel and could not switch to eager."
        )

    yield Progress(3, total, message="mapping attention to patches")
    fused = [recorder.reduced[layer] for layer in range(num_layers)]  # [N_l, N_l] each
    n_input = fused[0].shape[0]
    if n_input != specials + grid[0] * grid[1]:
        raise AttentionError(
            f"{name}: {n_input} tokens entered layer 0, expected {specials} special + {grid[0] * grid[1]} patches."
        )
    if handle is None:
        tokens_per_layer = [n_input] * num_layers
        output_tokens = n_input
    # entering[l][i]: the token of layer l (as it enters) that covers input token i.
    entering = [np.arange(n_input)]
    for assignment in assignments[:-1]:
        entering.append(entering[-1] if assignment is None else assignment)
    final = entering[-1] if assignments[-1] is None else assignments[-1]
    cls_attention = {}
    for layer in chosen:
        cover = entering[layer]  # [N_0]
        row = recorder.maps[layer][:, cover[0]]  # [heads, N_l]: the query of the token holding the CLS input
        sizes = np.bincount(cover, minlength=row.shape[1]).astype(np.float64)  # inputs each token covers
        # A merged token's weight divided evenly over the inputs it covers: the map still sums to <= 1.
        per_input = row[:, cover] / sizes[cover][None, :]  # [heads, N_0]
        cls_attention[layer] = per_input[:, specials:].reshape(-1, *grid).astype(np.float32)

    yield Progress(4, total, message="attention rollout")
    if handle is None:
        rollout_full = attention_rollout([f[None] for f in fused])  # [N_0, N_0]
        groups = None
    else:
        merges = merge_matrices(assignments, [*tokens_per_layer, output_tokens])
        rollout_full = merged_rollout([f[None] for f in fused], merges)  # [N_L, N_0]
        groups = final[specials:].reshape(grid).astype(np.int64)
        if final[0] != 0:
            notes.append("the class token was merged with patches (protect_cls=False): its row is that merged token's.")
    rollout = rollout_full[int(final[0]), specials:].reshape(grid).astype(np.float32)
    result = VisionAttention(
        model=name,
        image=shown,
        grid=grid,
        layers=chosen,
        num_layers=num_layers,
        heads=int(recorder.maps[chosen[0]].shape[0]),
        cls_attention=cls_attention,
        rollout=rollout,
        groups=groups,
        tokens_per_layer=tokens_per_layer,
        token_merging=None if token_merging is None else dict(token_merging),
        notes=notes,
        output_tokens=output_tokens,
        special_tokens=specials,
        head_fusion=head_fusion,
    )
    yield Progress(5, total, message="done")
    return result


def vision_attention(model, image, **kw) -> VisionAttention:
    """:func:`iter_vision_attention` run to the end (``core.jobs.drive``)."""
    return drive(iter_vision_attention(model, image, **kw))
