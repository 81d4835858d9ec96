"""The formula line of the recipe editor: what a merge computes, naming the models.

The direction of a merge ratio is the most common confusion between merge
tools (is 0.3 "30 % of A" or "30 % of B"?), so the editor always shows the
formula with the models' names and the effective shares, e.g.
``0.70 × mistral-base + 0.30 × mistral-chat``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from core.merge.document import RecipeDocument

_TASK_VECTOR_NOTES = {
    "task_arithmetic": "",
    "ties": "each delta trimmed to its largest magnitudes (density), signs elected per element",
    "dare_ties": "random drop of delta elements (density) with rescale, signs elected",
    "dare_linear": "random drop of delta elements (density) with rescale",
    "breadcrumbs": "outliers (gamma) and smallest deltas dropped",
    "breadcrumbs_ties": "outliers (gamma) and smallest deltas dropped, signs elected",
    "della": "magnitude-ranked random drop (density ± epsilon), signs elected",
    "della_linear": "magnitude-ranked random drop (density ± epsilon)",
}


def value_text(setting: Any) -> str:
    """0.3 -> '0.30'; a gradient -> '0.20→0.80 over layers'; filter conditions -> 'per tensor type'."""
    if setting is None:
        return "?"
    if isinstance(setting, bool):
        return str(setting).lower()
    if isinstance(setting, (int, float)):
        return _num(setting)
    if isinstance(setting, dict) and "blocks" in setting:
        default = setting.get("default")
        return "per block" + (f" (others {_num(default)})" if _scalar(default) is not None else "")
    if isinstance(setting, list) and setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        return f"{_num(setting[0])}→{_num(setting[-1])} over layers" if len(setting) > 1 else _num(setting[0])
    if isinstance(setting, dict) and "blocks" in setting:
        return "per block"
    if isinstance(setting, (dict, list)):
        return "per tensor type"
    return str(setting)


def _num(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


def _scalar(setting: Any) -> Optional[float]:
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    return None


def formula_text(doc: "RecipeDocument") -> str:
    if not doc.slots:
        return "Add models from the library to build a recipe."
    if not doc.editable:
        return f"{doc.method.display_name} over layer slices of {', '.join(s.name for s in doc.slots)} (see the YAML)."
    name = doc.method_name
    if name == "linear":
        return _linear(doc)
    if name == "slerp":
        return _slerp(doc)
    if name == "nuslerp":
        return _nuslerp(doc)
    if name in _TASK_VECTOR_NOTES:
        return _task_vectors(doc)
    if name == "widen":
        return _widen(doc)
    if name == "mwa":
        return _mwa(doc)
    if name in ("weighted_sum", "add_difference", "convert"):
        return _a1111(doc)
    return _generic(doc)


def _names(doc: "RecipeDocument", indices: list[int]) -> list[str]:
    return [doc.slots[i].name for i in indices]


def _linear(doc: "RecipeDocument") -> str:
    weights = [doc.param_value("weight", i) for i in range(len(doc.slots))]
    normalize = bool(doc.param_value("normalize"))
    scalars = [_scalar(w) for w in weights]
    names = _names(doc, list(range(len(doc.slots))))
    if all(s is not None for s in scalars):
        total = sum(scalars)  # type: ignore[arg-type]
        if normalize and total != 0:
            shares = [s / total for s in scalars]  # type: ignore[operator]
            return " + ".join(f"{_num(c)} × {n}" for c, n in zip(shares, names))
        if normalize:
            return "The weights sum to zero: with normalize on there is no average to take."
        return " + ".join(f"{_num(c)} × {n}" for c, n in zip(scalars, names))  # type: ignore[arg-type]
    terms = " + ".join(f"{value_text(w)} × {n}" for w, n in zip(weights, names))
    return f"({terms}) ÷ sum of weights" if normalize else terms


def _slerp(doc: "RecipeDocument") -> str:
    if doc.base_index is None or len(doc.slots) != 2:
        return "SLERP needs exactly two models, one of them marked as base."
    other = 1 - doc.base_index
    base, model = doc.slots[doc.base_index].name, doc.slots[other].name
    t = doc.param_value("t")
    ts = _scalar(t)
    if ts is None:
        return f"SLERP from {base} (t = 0) to {model} (t = 1), t = {value_text(t)}"
    return (
        f"SLERP from {base} (t = 0) to {model} (t = 1) at t = {_num(ts)}: "
        f"about {_pct(1 - ts)} {base}, {_pct(ts)} {model}"
    )


def _nuslerp(doc: "RecipeDocument") -> str:
    non_base = [i for i in range(len(doc.slots)) if i != doc.base_index]
    if len(non_base) != 2:
        return "NuSLERP takes two weighted models (plus an optional base)."
    w = [_scalar(doc.param_value("weight", i)) for i in non_base]
    a, b = _names(doc, non_base)
    over = f" as task vectors from {doc.slots[doc.base_index].name}" if doc.base_index is not None else ""
    if None in w or not sum(w):  # type: ignore[arg-type]
        return f"NuSLERP between {a} and {b}{over}"
    t = w[1] / (w[0] + w[1])  # type: ignore[operator]
    return f"NuSLERP from {a} (t = 0) to {b} (t = 1) at t = {_num(t)}{over}: about {_pct(1 - t)} {a}, {_pct(t)} {b}"


def _task_vectors(doc: "RecipeDocument") -> str:
    if doc.base_index is None:
        return f"{doc.method.display_name} needs a base model: mark one model as base."
    base = doc.slots[doc.base_index].name
    others = [i for i in range(len(doc.slots)) if i != doc.base_index]
    if not others:
        return f"{base} + (add models to merge into the base)"
    terms = " + ".join(f"{value_text(doc.param_value('weight', i))} × ({doc.slots[i].name} − {base})" for i in others)
    lam = doc.param_value("lambda")
    scale = "" if _scalar(lam) == 1.0 else f"{value_text(lam)} × "
    normalize = " ÷ sum of weights" if doc.param_value("normalize") else ""
    text = f"{base} + {scale}[{terms}]{normalize}"
    note = _TASK_VECTOR_NOTES[doc.method_name]
    densities = {value_text(doc.param_value("density", i)) for i in others}
    if note and "density" in note:
        note += f"; density {', '.join(sorted(densities))}"
    return f"{doc.method.display_name}: {text}" + (f" — {note}" if note else "")


def _widen(doc: "RecipeDocument") -> str:
    if doc.base_index is None:
        return "WIDEN needs a base model: mark one model as base."
    base = doc.slots[doc.base_index].name
    others = [doc.slots[i].name for i in range(len(doc.slots)) if i != doc.base_index]
    if len(others) < 2:
        return f"WIDEN merges two or more models into {base}: add models."
    terms = " + ".join(f"S_{n} × ({n} − {base})" for n in others)
    keys = ("temperature", "above_average_value_ratio", "score_calibration_value")
    tau, t, s = (value_text(doc.param_value(k)) for k in keys)
    return (
        f"WIDEN: {base} + {terms}, per column in magnitude and direction — S = softmax over the models "
        f"of each one's ranked change (temperature {tau}); a score above {t} × average becomes {s}"
    )


def _mwa(doc: "RecipeDocument") -> str:
    from core.merge.methods.mwa import metric_weights

    metric = str(doc.param_value("metric"))
    names = [doc.slots[i].name for i in range(len(doc.slots))]
    values = [doc.param_value(metric, i) for i in range(len(doc.slots))]
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        return f"Metrics-Weighted Averaging needs the {metric} of every checkpoint: set it for {', '.join(missing)}."
    rule = "lower loss weighs more" if metric == "loss" else "later step weighs more"
    penalty = doc.param_value("penalty")
    normalize = bool(doc.param_value("normalize"))
    p, scalars = _scalar(penalty), [_scalar(v) for v in values]
    if p is not None and all(v is not None and v > 0 for v in scalars):
        weights = metric_weights(scalars, metric, p, normalize)  # type: ignore[arg-type]
        terms = " + ".join(f"{_num(w)} × {n}" for w, n in zip(weights, names))
        return f"{terms} — weights from each {metric}, penalty {_num(p)} ({rule})"
    power = "^-p" if metric == "loss" else "^p"
    share = " ÷ their sum" if normalize else ""
    return (
        f"Weighted average of {', '.join(names)} — weights {metric}{power}{share}, "
        f"p = {value_text(penalty)} ({rule})"
    )


def _a1111(doc: "RecipeDocument") -> str:
    """A1111's modes, with the models in slot order A, B, C."""
    names = [s.name for s in doc.slots]
    name = doc.method_name
    if name == "convert":
        if len(names) != 1:
            return "No interpolation takes one model."
        return f"{names[0]}, written again (no interpolation)"
    if name == "weighted_sum":
        if len(names) != 2:
            return "Weighted sum takes exactly two models: A and B."
        alpha = doc.param_value("alpha")
        a = _scalar(alpha)
        if a is None:
            return f"{names[0]} × (1 − alpha) + {names[1]} × alpha, alpha {value_text(alpha)}"
        return f"{_num(1 - a)} × {names[0]} + {_num(a)} × {names[1]}"
    if len(names) != 3:
        return "Add difference takes exactly three models: A, B and C."
    m = doc.param_value("multiplier")
    return f"{names[0]} + {value_text(m)} × ({names[1]} − {names[2]})"


def _generic(doc: "RecipeDocument") -> str:
    names = [doc.display(i) for i in range(len(doc.slots))]
    params = [f"{p.name} = {_param_text(p, doc.param_value(p.name))}" for p in doc.method.global_parameters]
    inside = ", ".join(names + params)
    return f"{doc.method.display_name}({inside})"


def _param_text(param: Any, setting: Any) -> str:
    """An integer parameter (karcher's max_iter) reads as an integer, not '10.00'."""
    if param.kind is int and isinstance(setting, int) and not isinstance(setting, bool):
        return str(setting)
    return value_text(setting)


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"
