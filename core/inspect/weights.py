"""Layer-wise weight differences between models, streamed one tensor at a time.

Given a reference (the base when one is given, else the first model) and models
``x_1 .. x_M``, every tensor the models share is compared through its *task vector*
``delta_i = x_i - ref`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic",
https://arxiv.org/abs/2212.04089):

* ``rel_l2[i] = ||delta_i|| / ||ref||`` -- how far the model moved, relative to the size
  of the weights (``abs_l2[i] = ||delta_i||`` as well);
* ``top10_share[i]`` -- the share of ``sum |delta_i|`` held by its 10 % largest entries
  (``k = ceil(0.1 * numel)``): near 0.1 for an even change, near 1 for a few outliers,
  which is what magnitude pruning in TIES / DARE relies on;
* ``cosine[i][j]`` -- cosine similarity between task vectors ``[M, M]``;
* ``sign_conflict`` -- among entries where at least two task vectors are non-zero, the
  fraction whose non-zero signs disagree: the interference TIES resolves by sign
  election (Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708).

Conventions for degenerate tensors (never a division by zero, never a warning):
``rel_l2`` is 0 when the model equals the reference and NaN when the reference tensor
is all zeros but the model's is not (``abs_l2`` still says how far it moved);
``top10_share`` is 0 when the task vector is all zeros; ``cosine`` with an all-zero task
vector is 0 (its diagonal entry too); ``sign_conflict`` is 0 when no entry has two
non-zero task vectors. So identical models give zeros everywhere; NaN in a heatmap
means "absent" (or the one undefined ``rel_l2`` case above).

Streaming: for each tensor name the reference tensor and one tensor per compared model
are read (:meth:`core.io.formats.ModelSource.get`), reduced to a few numbers and
dropped before the next name is read. The arithmetic runs in float64 (float32 on MPS,
which has no float64) over chunks of at most a million entries
(:mod:`core.inspect.chunked`), so peak memory is the tensors of one name as stored
plus a few chunks, whatever the model size. torch is imported inside the functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional, Sequence, Union

from core.errors import MergeStudioError, ModelError
from core.inspect import chunked
from core.io.formats import ModelSource, open_model
from core.jobs import Progress, drive
from core.merge.layers import detect_layout

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

ModelRef = Union[str, Path]

METRICS = ("rel_l2", "abs_l2", "top10_share", "sign_conflict", "cosine")
PER_MODEL_METRICS = ("rel_l2", "abs_l2", "top10_share")
TOP_FRACTION = 0.1
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# Tensors whose first dimension is the vocabulary: a mismatch there is a different vocabulary.
_VOCAB_MARKERS = ("embed_tokens", "wte", "word_embeddings", "token_embedding", "lm_head", "embed_out", "shared")


@dataclass
class TensorDiff:
    """Figures for one tensor; per-model lists have one entry per compared model ``[M]``."""

    name: str
    layer: Optional[int]
    module: str  # name without the layer prefix ("self_attn.q_proj.weight"); the full name outside layers
    shape: tuple[int, ...]
    numel: int
    rel_l2: list[float]  # ||x_i - ref|| / ||ref||
    abs_l2: list[float]  # ||x_i - ref||
    top10_share: list[float]  # share of sum|delta_i| in the 10 % largest |delta_i|
    cosine: Optional[list[list[float]]]  # [M, M] between task vectors; None when M < 2
    sign_conflict: Optional[float]  # None when M < 2

    def value(self, metric: str, model: int = 0, pair: Optional[tuple[int, int]] = None) -> float:
        """One number for a heatmap cell (see :meth:`WeightDiff.heatmap`); NaN when undefined."""
        if metric in PER_MODEL_METRICS:
            return getattr(self, metric)[model]
        if metric == "sign_conflict":
            return math.nan if self.sign_conflict is None else self.sign_conflict
        if metric == "cosine":
            if self.cosine is None:
                return math.nan
            if pair is not None:
                return self.cosine[pair[0]][pair[1]]
            m = len(self.cosine)
            return sum(self.cosine[i][j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        raise _unknown_metric(metric)


def _unknown_metric(metric: str) -> MergeStudioError:
    return MergeStudioError(f"Unknown weight-difference metric '{metric}'; expected one of {', '.join(METRICS)}.")


@dataclass
class WeightDiff:
    """The result of :func:`weight_diff`: per-tensor figures and what could not be compared."""

    models: list[str]  # as given
    base: Optional[str]
    reference: str  # base if given, else models[0]
    tensors: list[TensorDiff]
    skipped: list[tuple[str, str]]  # (tensor, reason): never silently left out
    layers: list[int]  # heatmap rows, ascending
    modules: list[str]  # heatmap columns, in first-seen order
    _cells: dict[tuple[int, str], TensorDiff] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._cells = {(t.layer, t.module): t for t in self.tensors if t.layer is not None}

    @property
    def compared(self) -> list[str]:
        """The models the per-model lists refer to, in order (the reference is not one of them)."""
        return list(self.models) if self.base is not None else list(self.models[1:])

    def _check(self, metric: str, model: int) -> None:
        if metric not in METRICS:
            raise _unknown_metric(metric)
        if metric in PER_MODEL_METRICS and not 0 <= model < len(self.compared):
            raise MergeStudioError(
                f"Model index {model} is out of range: {len(self.compared)} model(s) "
                f"were compared with {self.reference}."
            )

    def cell(self, layer: int, module: str) -> Optional[TensorDiff]:
        return self._cells.get((layer, module))

    def heatmap(
        self, metric: str = "rel_l2", model: int = 0, pair: Optional[tuple[int, int]] = None
    ) -> tuple["np.ndarray", list[int], list[str]]:
        """``values [layers, modules]`` (NaN where a layer lacks a module), rows, columns.

        ``model`` picks the compared model for per-model metrics. For ``cosine`` the cell
        is ``cosine[pair]`` when ``pair`` is given, else the mean of the off-diagonal
        entries (all pairs of task vectors); ``sign_conflict`` involves all models.
        """
        import numpy as np

        self._check(metric, model)
        values = np.full((len(self.layers), len(self.modules)), np.nan, dtype=np.float64)
        rows = {layer: i for i, layer in enumerate(self.layers)}
        cols = {module: j for j, module in enumerate(self.modules)}
        for t in self._cells.values():
            values[rows[t.layer], cols[t.module]] = t.value(metric, model, pair)
        return values, list(self.layers), list(self.modules)

    def per_layer(
        self, metric: str = "rel_l2", model: int = 0, pair: Optional[tuple[int, int]] = None
    ) -> list[tuple[int, float]]:
        """One figure per layer: the mean of its tensors' figures weighted by their ``numel``
        (``sum(v_t * numel_t) / sum(numel_t)`` over tensors with a defined value), so a
        large projection counts for more than a norm vector; NaN for a layer with none."""
        self._check(metric, model)
        sums: dict[int, list[float]] = {layer: [0.0, 0.0] for layer in self.layers}
        for t in self._cells.values():
            v = t.value(metric, model, pair)
            if math.isfinite(v):
                sums[t.layer][0] += v * t.numel
                sums[t.layer][1] += t.numel
        return [(layer, s / n if n else math.nan) for layer, (s, n) in sums.items()]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; NaN and infinities become None."""
        return {
            "models": list(self.models),
            "base": self.base,
            "reference": self.reference,
            "compared": self.compared,
            "layers": list(self.layers),
            "modules": list(self.modules),
            "tensors": [_jsonable(asdict(t)) for t in self.tensors],
            "skipped": [list(s) for s in self.skipped],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- the job


def _shape_reason(name: str, shapes: list[tuple[tuple[int, ...], str]]) -> str:
    (s0, p0), (s1, p1) = shapes[0], next(s for s in shapes if s[0] != shapes[0][0])
    vocab = (
        len(s0) == len(s1) and len(s0) >= 1 and s0[1:] == s1[1:]
        and any(marker in name for marker in _VOCAB_MARKERS)
    )
    label = "different vocabularies" if vocab else "shapes differ"
    return f"{label}: {list(s0)} in {p0} vs {list(s1)} in {p1}"


def _plan(ref: ModelSource, others: list[ModelSource]) -> tuple[list[str], list[tuple[str, str]]]:
    """Tensor names to compare (reference order) and (name, reason) for the rest."""
    for other in others:
        if not set(ref.tensors) & set(other.tensors):
            raise ModelError(
                f"{ref.path} and {other.path} have no tensor names in common "
                "(different architectures?), so there is nothing to compare."
            )
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name, info in ref.tensors.items():
        reasons = [f"missing in {o.path}" for o in others if name not in o.tensors]
        present = [(info.shape, str(ref.path))] + [
            (o.tensors[name].shape, str(o.path)) for o in others if name in o.tensors
        ]
        if len({s for s, _ in present}) > 1:
            reasons.append(_shape_reason(name, present))
        dtypes = {info.dtype} | {o.tensors[name].dtype for o in others if name in o.tensors}
        non_float = sorted(d for d in dtypes if d not in FLOAT_DTYPES)
        if non_float:
            reasons.append(f"not a floating-point tensor ({', '.join(non_float)})")
        if reasons:
            skipped.append((name, "; ".join(reasons)))
        else:
            names.append(name)
    extra: dict[str, list[str]] = {}
    for o in others:
        for name in o.tensors:
            if name not in ref.tensors:
                extra.setdefault(name, []).append(str(o.path))
    for name, paths in extra.items():
        skipped.append((name, f"not in the reference {ref.path}; only in {', '.join(paths)}"))
    return names, skipped


def iter_weight_diff(
    models: Sequence[ModelRef],
    base: Optional[ModelRef] = None,
    *,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> Generator[Progress, None, WeightDiff]:
    """Compare ``models`` with ``base`` (or, without one, ``models[1:]`` with ``models[0]``).

    Yields :class:`Progress` (tensors done, bytes read) after each tensor; returns a
    :class:`WeightDiff`. Only headers are read before the first Progress, so shape and
    architecture problems are found before any weight is touched. Raises
    MergeStudioError for fewer than two models (one with a base) or for a pair of
    models without any tensor name in common.
    """
    import torch

    paths = [Path(m).expanduser() for m in models]
    if len(paths) + (base is not None) < 2:
        named = f" ({paths[0]})" if paths else ""
        raise MergeStudioError(
            f"Weight differences need two models, or a model and a base; got {len(paths)} model(s){named}."
        )
    ref_path = Path(base).expanduser() if base is not None else paths[0]
    other_paths = paths if base is not None else paths[1:]
    dtype = torch.float32 if str(device).startswith("mps") else torch.float64
    sources: list[ModelSource] = []
    try:
        ref = open_model(ref_path, allow_pickle=allow_pickle)
        sources.append(ref)
        for p in other_paths:
            sources.append(open_model(p, allow_pickle=allow_pickle))
        others = sources[1:]
        names, skipped = _plan(ref, others)
        layout = detect_layout(ref.tensors, ref.config)
        bytes_total = sum(s.tensors[n].nbytes for n in names for s in sources)
        bytes_done = 0
        start = time.monotonic()
        yield Progress(0, len(names), 0, bytes_total, 0.0, f"comparing {len(names)} tensors")
        results: list[TensorDiff] = []
        for i, name in enumerate(names):
            # Each tensor as read (its own dtype); the float64 arithmetic runs over
            # bounded chunks of it (core/inspect/chunked.py), so a huge embedding
            # costs its size on disk once per model, not several float64 copies.
            ref_t = ref.get(name).to(device=device)
            tensors = [o.get(name).to(device=device) for o in others]
            figures = chunked.figures(ref_t, tensors, dtype, TOP_FRACTION)
            del ref_t, tensors
            split = layout.split(name)
            layer, module = split if split is not None else (None, name)
            info = ref.tensors[name]
            results.append(TensorDiff(name, layer, module, tuple(info.shape), info.numel, **figures))
            bytes_done += sum(s.tensors[name].nbytes for s in sources)
            yield Progress(i + 1, len(names), bytes_done, bytes_total, time.monotonic() - start, name)
    finally:
        for s in sources:
            s.close()
    layers = sorted({t.layer for t in results if t.layer is not None})
    modules = list(dict.fromkeys(t.module for t in results if t.layer is not None))
    return WeightDiff(
        models=[str(m) for m in models],
        base=None if base is None else str(base),
        reference=str(base if base is not None else models[0]),
        tensors=results,
        skipped=skipped,
        layers=layers,
        modules=modules,
    )


def weight_diff(models: Sequence[ModelRef], base: Optional[ModelRef] = None, **kw: Any) -> WeightDiff:
    """:func:`iter_weight_diff` driven to the end (``on_progress`` and ``cancel`` as in
    :func:`core.jobs.drive`; other keywords go to iter_weight_diff)."""
    on_progress = kw.pop("on_progress", None)
    cancel = kw.pop("cancel", None)
    return drive(iter_weight_diff(models, base, **kw), on_progress, cancel)
