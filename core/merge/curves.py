"""Per-layer curves: parameter values that vary over the layers.

mergekit writes such a value as a *gradient*, a list of anchors spread evenly
over the layers of a slice (layer i of n sits at t = i/(n-1), t = 1 when
n == 1), linearly interpolated between neighbouring anchors; optionally one
gradient per tensor filter (``[{filter: self_attn, value: [...]}, {value:
[...]}]``, the first filter that is a substring of the tensor name wins).
A1111 / ComfyUI users know the same idea as "block weights".

:class:`Curve` is one gradient, :class:`LayerCurves` a default curve plus
optional attention and MLP curves: what the curve editor edits. Both are
immutable and convert to and from recipe settings. Pure Python: no torch, no Qt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from core.errors import RecipeError

_DIGITS = 6  # significant digits written to recipes


class CurveError(RecipeError, ValueError):
    """A value that is not a curve (also a ValueError, for plain-Python callers)."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CurveError(f"{where}: expected a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise CurveError(f"{where}: expected a finite number, got {value!r}.")
    return number


def _rounded(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")


@dataclass(frozen=True)
class Curve:
    """Anchor values spread evenly over t in [0, 1] (at least one)."""

    anchors: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.anchors, (str, bytes)) or not isinstance(self.anchors, Iterable):
            raise CurveError(f"Curve anchors must be a list of numbers, got {self.anchors!r}.")
        values = tuple(_number(v, f"Curve anchor {i}") for i, v in enumerate(self.anchors))
        if not values:
            raise CurveError("A curve needs at least one anchor value.")
        object.__setattr__(self, "anchors", values)

    def __len__(self) -> int:
        return len(self.anchors)

    def value_at(self, t: float) -> float:
        """The value at position t, interpolated exactly as mergekit does."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"Curve position t must lie in [0, 1], got {t!r}.")
        a = self.anchors
        scaled = t * (len(a) - 1)
        i0 = int(scaled)
        i1 = min(len(a) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * a[i0] + frac * a[i1]

    def at_layers(self, n: int) -> list[float]:
        """The value each of ``n`` layers gets (layer i at t = i/(n-1); t = 1 for one layer)."""
        if n < 1:
            raise ValueError(f"A curve needs at least one layer to evaluate, got n = {n}.")
        if n == 1:
            return [self.value_at(1.0)]
        return [self.value_at(i / (n - 1)) for i in range(n)]

    def with_anchor(self, i: int, value: float) -> "Curve":
        """This curve with anchor ``i`` set to ``value``."""
        if not 0 <= i < len(self.anchors):
            raise IndexError(f"Anchor {i} does not exist; the curve has {len(self.anchors)} anchors.")
        anchors = list(self.anchors)
        anchors[i] = _number(value, f"Curve anchor {i}")
        return Curve(tuple(anchors))

    def mean(self) -> float:
        """The mean of the piecewise-linear curve over t in [0, 1]."""
        a = self.anchors
        if len(a) == 1:
            return a[0]
        return sum((a[i] + a[i + 1]) / 2 for i in range(len(a) - 1)) / (len(a) - 1)

    def resampled(self, k: int) -> "Curve":
        """``k`` anchors sampling this curve evenly; one anchor is the curve's mean."""
        if k < 1:
            raise ValueError(f"A curve needs at least one anchor, got k = {k}.")
        if k == 1:
            return Curve((self.mean(),))
        return Curve(tuple(self.value_at(j / (k - 1)) for j in range(k)))

    def smoothed(self, passes: int = 1) -> "Curve":
        """Binomial [1, 2, 1] / 4 smoothing, ends mirrored (a flat curve stays flat)."""
        if passes < 0:
            raise ValueError(f"Smoothing passes must be 0 or more, got {passes}.")
        a = list(self.anchors)
        if len(a) == 1:
            return self
        last = len(a) - 1
        for _ in range(passes):
            a = [
                (a[abs(i - 1)] + 2 * a[i] + a[last - abs(last - i - 1)]) / 4
                for i in range(len(a))
            ]
        return Curve(tuple(a))

    def clamped(self, lo: float, hi: float) -> "Curve":
        """Every anchor limited to [lo, hi]."""
        if lo > hi:
            raise ValueError(f"Clamp range is empty: low {lo!r} is above high {hi!r}.")
        return Curve(tuple(min(hi, max(lo, v)) for v in self.anchors))

    def to_setting(self) -> float | list[float]:
        """A recipe value: the scalar for one anchor, else the gradient (6 significant digits)."""
        values = [_rounded(v) for v in self.anchors]
        return values[0] if len(values) == 1 else values

    @staticmethod
    def from_setting(value: Any) -> "Curve":
        """A curve from a recipe value: a number or a non-empty list of numbers."""
        if isinstance(value, list):
            if not value:
                raise CurveError("An empty list is not a curve; give at least one number.")
            return Curve(tuple(_number(v, f"Gradient entry {i}") for i, v in enumerate(value)))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CurveError(f"A curve is a number or a list of numbers, got {value!r}.")
        return Curve((_number(value, "Curve value"),))


# -- presets ------------------------------------------------------------------
def _preset(shape: Callable[[float], float]) -> Callable[[int, float, float], Curve]:
    """A preset from a shape s(t) in [0, 1]: value = low + (high - low) * s(t)."""

    def build(k: int, low: float, high: float) -> Curve:
        if k < 1:
            raise ValueError(f"A preset needs at least one anchor, got k = {k}.")
        ts = [0.5] if k == 1 else [j / (k - 1) for j in range(k)]
        return Curve(tuple(low + (high - low) * shape(t) for t in ts))

    return build


def _smoothstep(t: float) -> float:
    return t * t * (3 - 2 * t)


PRESETS: dict[str, Callable[[int, float, float], Curve]] = {
    "Flat": _preset(lambda t: 0.5),
    "Ramp up": _preset(lambda t: t),
    "Ramp down": _preset(lambda t: 1 - t),
    "Middle high": _preset(lambda t: 1 - abs(2 * t - 1)),
    "Middle low": _preset(lambda t: abs(2 * t - 1)),
    "Step up (second half)": _preset(lambda t: 1.0 if t >= 0.5 else 0.0),
    "Step down (second half)": _preset(lambda t: 0.0 if t >= 0.5 else 1.0),
    "Smooth ramp up": _preset(_smoothstep),
    "Smooth ramp down": _preset(lambda t: 1 - _smoothstep(t)),
}
"""name -> (k anchors, low, high) -> Curve. "Flat" sits halfway between low and high;
with one anchor every preset takes its value at t = 0.5."""


# -- filtered curves ------------------------------------------------------------
@dataclass(frozen=True)
class CurveGroup:
    """One curve of a filtered setting."""

    key: str  # "default" | "attention" | "mlp"
    label: str  # "All tensors" | "Attention" | "MLP"
    filters: tuple[str, ...]  # substrings written as filter conditions (empty for default)
    curve: Curve


def _check_filters(filters: tuple[str, ...], what: str) -> tuple[str, ...]:
    filters = tuple(filters)
    if not filters:
        raise CurveError(f"The {what} curve needs at least one filter (part of a tensor name).")
    for f in filters:
        if not isinstance(f, str) or not f or f == "*":
            raise CurveError(f"{what} filter {f!r} must be a non-empty part of a tensor name.")
    return filters


@dataclass(frozen=True)
class LayerCurves:
    """A default curve plus optional attention and MLP curves (what the editor edits)."""

    default: Curve
    attention: Optional[Curve] = None
    mlp: Optional[Curve] = None
    attention_filters: tuple[str, ...] = ("self_attn",)
    mlp_filters: tuple[str, ...] = ("mlp",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_filters", _check_filters(self.attention_filters, "Attention"))
        object.__setattr__(self, "mlp_filters", _check_filters(self.mlp_filters, "MLP"))

    @property
    def split(self) -> bool:
        """True when attention or MLP tensors have their own curve."""
        return self.attention is not None or self.mlp is not None

    def groups(self) -> list[CurveGroup]:
        """The curves present: default first, then attention, then MLP."""
        out = [CurveGroup("default", "All tensors", (), self.default)]
        if self.attention is not None:
            out.append(CurveGroup("attention", "Attention", self.attention_filters, self.attention))
        if self.mlp is not None:
            out.append(CurveGroup("mlp", "MLP", self.mlp_filters, self.mlp))
        return out

    def curve(self, key: str) -> Curve:
        """The curve of group ``key``; KeyError when that group is absent."""
        for group in self.groups():
            if group.key == key:
                return group.curve
        raise KeyError(f"No '{key}' curve in these layer curves.")

    def replace(self, key: str, curve: Curve) -> "LayerCurves":
        """These curves with group ``key`` set to ``curve``."""
        if key not in ("default", "attention", "mlp"):
            raise KeyError(f"Unknown curve group '{key}' (use default, attention or mlp).")
        fields = {"default": self.default, "attention": self.attention, "mlp": self.mlp}
        fields[key] = curve
        return LayerCurves(
            fields["default"], fields["attention"], fields["mlp"], self.attention_filters, self.mlp_filters
        )

    def to_setting(self) -> Any:
        """The recipe value: a plain curve, or filter conditions (attention, MLP, then default)."""
        if not self.split:
            return self.default.to_setting()
        conditions: list[dict[str, Any]] = []
        for group in self.groups()[1:]:
            for flt in group.filters:
                conditions.append({"filter": flt, "value": group.curve.to_setting()})
        conditions.append({"value": self.default.to_setting()})
        return conditions

    @staticmethod
    def from_setting(
        value: Any,
        attention_filters: tuple[str, ...] = ("self_attn",),
        mlp_filters: tuple[str, ...] = ("mlp",),
    ) -> Optional["LayerCurves"]:
        """The curves a setting describes; None when these curves cannot show it exactly.

        A setting is shown only when evaluating it gives the same value for every
        tensor: conditions for each attention filter, then for each MLP filter
        (one curve per group, each filter once), then one unfiltered default last.
        """
        attention_filters, mlp_filters = tuple(attention_filters), tuple(mlp_filters)
        conditions = isinstance(value, dict) or (isinstance(value, list) and all(isinstance(c, dict) for c in value))
        if not conditions:
            try:
                curve = Curve.from_setting(value)
            except ValueError:
                return None
            return LayerCurves(curve, attention_filters=attention_filters, mlp_filters=mlp_filters)
        return _from_conditions([value] if isinstance(value, dict) else value, attention_filters, mlp_filters)

    def value_for(self, tensor_name: str, t: float) -> float:
        """The value mergekit uses for ``tensor_name`` at layer position ``t`` (as written)."""
        curve = self.default
        for group in self.groups()[1:]:
            if any(flt in tensor_name for flt in group.filters):
                curve = group.curve
                break
        return Curve.from_setting(curve.to_setting()).value_at(t)


def _from_conditions(
    conditions: list[dict], attention_filters: tuple[str, ...], mlp_filters: tuple[str, ...]
) -> Optional[LayerCurves]:
    found: dict[str, dict[str, Curve]] = {"attention": {}, "mlp": {}}
    phase = 0  # 0: attention conditions, 1: MLP conditions (mergekit's first match makes order matter)
    default: Optional[Curve] = None
    for cond in conditions:
        if default is not None or not set(cond) <= {"filter", "value"} or "value" not in cond:
            return None
        try:
            curve = Curve.from_setting(cond["value"])
        except ValueError:
            return None
        flt = cond.get("filter")
        if flt is None or flt == "*":
            default = curve
            continue
        if flt in attention_filters and phase == 0:
            group = "attention"
        elif flt in mlp_filters:
            group, phase = "mlp", 1
        else:
            return None
        if flt in found[group]:
            return None
        found[group][flt] = curve
    if default is None:
        return None
    curves: dict[str, Optional[Curve]] = {}
    for group, filters in (("attention", attention_filters), ("mlp", mlp_filters)):
        got = found[group]
        if not got:
            curves[group] = None
        elif set(got) == set(filters) and len(set(got.values())) == 1:
            curves[group] = next(iter(got.values()))
        else:
            return None
    return LayerCurves(default, curves["attention"], curves["mlp"], attention_filters, mlp_filters)


# -- architecture filters -------------------------------------------------------
_ATTENTION_CANDIDATES = ("self_attn", "self_attention", "attention", "attn")
_MLP_CANDIDATES: tuple[tuple[str, ...], ...] = (("mlp",), ("feed_forward",), ("ffn",), ("intermediate", "output"))


def detect_filters(tensor_names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Attention and MLP filter substrings that match this architecture's tensors.

    llama/mistral/qwen: ("self_attn",), ("mlp",); GPT-2: ("attn",), ("mlp",);
    BERT: ("attention",), ("intermediate", "output") (attention is written
    first, so "attention.output" tensors go to attention). Unknown layouts get
    ("attn",), ("mlp",).
    """
    names = list(tensor_names)

    def present(sub: str) -> bool:
        return any(sub in name for name in names)

    attention = next((c for c in _ATTENTION_CANDIDATES if present(c)), "attn")
    mlp: tuple[str, ...] = ("mlp",)
    for candidate in _MLP_CANDIDATES:
        if present(candidate[0]):
            mlp = tuple(c for c in candidate if present(c))
            break
    return (attention,), mlp


# --------------------------------------------------------------------------- block weights (Stable Diffusion)


def block_values(setting: Any, names: Sequence[str], fallback: float) -> Optional[list[float]]:
    """One value per block of ``names`` for a setting: a number (the same everywhere), or
    ``{blocks: {NAME: v, ...}, default: v}`` (unnamed blocks take ``default``, else ``fallback``).

    None when the setting cannot be shown as one value per block (a gradient, filters,
    the comma-separated string form is read by the engine, not here).
    """
    if isinstance(setting, bool):
        return None
    if isinstance(setting, (int, float)):
        return [float(setting)] * len(names)
    if setting is None:
        return [float(fallback)] * len(names)
    if not isinstance(setting, dict) or "blocks" not in setting or not isinstance(setting["blocks"], dict):
        return None
    default = setting.get("default", fallback)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    values = []
    for name in names:
        value = setting["blocks"].get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        values.append(float(value))
    extra = set(setting["blocks"]) - set(names)
    if extra:
        return None  # blocks the curve does not show (TE1, TE2, VAE): keep editing that in YAML
    return values


def block_setting(values: Sequence[float], names: Sequence[str]) -> dict:
    """``{blocks: {NAME: v, ...}}`` for one value per block (6 significant digits, as gradients)."""
    if len(values) != len(names):
        raise CurveError(f"{len(values)} values for {len(names)} blocks.")
    return {"blocks": {name: float(f"{v:.6g}") for name, v in zip(names, values)}}


def block_bands(names: Sequence[str]) -> list[tuple[int, int, str]]:
    """The IN / MID / OUT spans (first index, last index, label) of a block list."""
    bands = []
    for label, prefix in (("IN", "IN"), ("MID", "M"), ("OUT", "OUT")):
        idx = [i for i, n in enumerate(names) if n.startswith(prefix) and (prefix != "IN" or n[2:].isdigit())]
        if idx:
            bands.append((idx[0], idx[-1], label))
    return bands
