"""Token-merging presets: a method and its options in a small JSON file.

The app saves them from the Tokens panel, ``mergestudio tokens bench --preset FILE``
reads them, and ``resources/presets/tokens/`` ships examples::

    {
      "format": "mergestudio-tokens-preset",
      "version": 1,
      "method": "tome",
      "options": {"r": 13},
      "model": "google/vit-base-patch16-224",
      "note": "ToMe paper, ViT-B/16 off the shelf"
    }

``model`` (what the setting was chosen for) and ``note`` are optional text. The
options are checked against :func:`core.tokens.methods` when a preset is loaded
or saved: names, types, ``range``\\ s and ``choices`` (tomesd's ``ratio`` against
``1 - 1/(sx*sy)`` of the preset's own ``sx``/``sy``). ``r`` is an int, a list of
whole numbers (one per layer) or ``[r, inflection]`` with the inflection written
as a decimal number (``[13, -1.0]``), which loads as the pair ``(13, -1.0)``;
``threshold`` may be one number per layer too. Whether r suits a given model
(its token count) is checked by :func:`core.tokens.apply`, which knows the model.

Importing this module is cheap: nothing here imports torch.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from core.errors import MergeStudioError

PRESET_FORMAT = "mergestudio-tokens-preset"
PRESET_VERSION = 1
FIELDS = ("format", "version", "method", "options", "model", "note")
# Float options that also take one value per layer (the engine's threshold mode).
PER_LAYER_FLOATS = frozenset({"threshold"})

PathLike = Union[str, "os.PathLike[str]"]


class PresetError(MergeStudioError):
    """A token preset cannot be read, written or used; the message names the file and the field."""


@dataclass(frozen=True)
class TokenPreset:
    """A method and its options, ready for ``core.tokens.apply(model, method=..., **options)``."""

    method: str
    options: dict
    model: Optional[str] = None
    note: Optional[str] = None


# ----------------------------------------------------------------------------- to and from JSON


def _plain(value: Any) -> Any:
    """JSON form of an option value: tuples as lists, a pair's inflection as a decimal number."""
    if isinstance(value, tuple):
        items = [_plain(v) for v in value]
        if len(items) == 2 and isinstance(items[1], int) and not isinstance(items[1], bool):
            items[1] = float(items[1])  # (13, -1) is a pair: written [13, -1.0], never read back as per-layer
        return items
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def preset_dict(preset: TokenPreset) -> dict:
    """The preset as the JSON object of its file (``model`` and ``note`` only when set)."""
    data: dict[str, Any] = {
        "format": PRESET_FORMAT,
        "version": PRESET_VERSION,
        "method": preset.method,
        "options": {name: _plain(value) for name, value in dict(preset.options).items()},
    }
    if preset.model is not None:
        data["model"] = preset.model
    if preset.note is not None:
        data["note"] = preset.note
    return data


def save_preset(path: PathLike, preset: TokenPreset) -> Path:
    """Write the preset as pretty JSON, atomically (a temporary file renamed over ``path``).

    The preset is checked as :func:`load_preset` checks a file, so what is saved
    loads again; the folder must exist. Raises :class:`PresetError`.
    """
    target = Path(os.fspath(path))
    data = preset_dict(preset)
    _check(data, target)
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:  # unreachable after _check; kept for a clear sentence
        raise PresetError(f"The token preset {target} cannot be written as JSON ({exc}).") from None
    folder = target.parent
    if not folder.is_dir():
        raise PresetError(f"The folder {folder} for the token preset {target.name} does not exist.")
    if target.is_dir():
        raise PresetError(f"The token preset {target} cannot be written: a folder has that name.")
    part = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=folder, prefix=f".{target.name}.", suffix=".part", delete=False
        ) as f:
            part = Path(f.name)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, target)
    except OSError as exc:
        if part is not None:
            part.unlink(missing_ok=True)
        raise PresetError(f"The token preset {target} cannot be written ({exc.strerror or exc}).") from None
    return target


def load_preset(path: PathLike) -> TokenPreset:
    """Read and check a preset file; raises :class:`PresetError` naming the file and the field."""
    source = Path(os.fspath(path))
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PresetError(f"The token preset {source} is not a UTF-8 text file.") from None
    except OSError as exc:
        raise PresetError(f"The token preset {source} cannot be read ({exc.strerror or exc}).") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        detail = f"{exc.msg} at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
        raise PresetError(f"The token preset {source} is not valid JSON ({detail}).") from None
    return _check(data, source)


# ----------------------------------------------------------------------------- checks


def _fail(where: Path, field: str, problem: str) -> PresetError:
    return PresetError(f"In the token preset {where}, field '{field}' {problem}.")


def _check(data: Any, where: Path) -> TokenPreset:
    """The checked preset of a file's JSON object (options decoded: ``[r, inflection]`` -> a pair)."""
    if not isinstance(data, dict):
        raise PresetError(f"The token preset {where} must hold a JSON object, not a JSON {_json_kind(data)}.")
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        fields = ", ".join(FIELDS)
        raise _fail(where, unknown[0], f"is not a preset field{_nearest(unknown[0], FIELDS)}; the fields are {fields}")
    if data.get("format") != PRESET_FORMAT:
        found = "is missing" if "format" not in data else f"is {data['format']!r}"
        raise _fail(where, "format", f"{found}; a token preset has \"format\": \"{PRESET_FORMAT}\"")
    version = data.get("version")
    if version != PRESET_VERSION or isinstance(version, bool):
        found = "is missing" if "version" not in data else f"is {version!r}"
        raise _fail(where, "version", f"{found}; this Merge Studio reads version {PRESET_VERSION}")
    for name in ("model", "note"):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or (name == "model" and not value.strip())):
            raise _fail(where, name, f"must be text (or left out), not {value!r}")
    specs = _method_specs()
    method = data.get("method")
    if not isinstance(method, str):
        found = "is missing" if "method" not in data else f"must be a method name, not {method!r}"
        raise _fail(where, "method", f"{found}; the methods are {', '.join(specs)}")
    if method not in specs:
        known = f"{_nearest(method, specs)}; the methods are {', '.join(specs)}"
        raise _fail(where, "method", f"is {method!r}, not a token-merging method{known}")
    options = data.get("options")
    if not isinstance(options, dict):
        found = "is missing" if "options" not in data else f"must be a JSON object, not a JSON {_json_kind(options)}"
        raise _fail(where, "options", f"{found} (use {{}} for the method's defaults)")
    checked = _check_options(options, method, specs[method], where)
    return TokenPreset(method=method, options=checked, model=data.get("model"), note=data.get("note"))


def _method_specs() -> dict[str, dict[str, dict]]:
    """``{method: {option: parameter schema}}`` from :func:`core.tokens.methods`."""
    from core.tokens import methods

    return {m["name"]: {p["name"]: p for p in m["parameters"]} for m in methods()}


def _ranges(method: str, params: dict[str, dict], options: dict) -> dict[str, Optional[tuple]]:
    """Each option's (low, high), tomesd's ratio bound for the preset's own sx and sy."""
    ranges = {name: tuple(p["range"]) if p["range"] is not None else None for name, p in params.items()}
    if method == "tomesd":
        from core.tokens import diffusion

        sx, sy = options.get("sx", params["sx"]["default"]), options.get("sy", params["sy"]["default"])
        if _is_int(sx) and _is_int(sy) and sx >= 1 and sy >= 1:
            ranges["ratio"] = diffusion.legal_ranges("tomesd", sx=sx, sy=sy)["ratio"]
    return ranges


def _check_options(options: dict, method: str, params: dict[str, dict], where: Path) -> dict:
    for name in options:
        if name not in params:
            raise _fail(
                where,
                f"options.{name}",
                f"is not an option of method {method!r}{_nearest(name, params)}; its options are {', '.join(params)}",
            )
    ranges = _ranges(method, params, options)
    checked = {}
    for name in sorted(options, key=lambda n: n == "ratio"):  # tomesd's ratio after the sx, sy its bound needs
        value = options[name]
        spec = params[name]
        field = f"options.{name}"
        if value is None:
            if spec["default"] is not None:
                raise _fail(where, field, f"is null; give a value (the default is {spec['default']!r}) or leave it out")
            checked[name] = None
            continue
        checked[name] = _check_value(value, spec, ranges.get(name), where, field)
    for name, value in checked.items():
        for other in params[name]["exclusive"]:
            if value is not None and checked.get(other) is not None:
                raise _fail(where, f"options.{name}", f"cannot be given together with options.{other}; choose one")
    return {name: checked[name] for name in options}  # in the file's order


def _check_value(value: Any, spec: dict, bounds: Optional[tuple], where: Path, field: str) -> Any:
    kind = spec["type"]
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(where, field, f"must be true or false, not {_shown(value)}")
        return value
    if kind == "choice":
        choices = spec["choices"] or []
        if isinstance(value, bool) or value not in choices:
            raise _fail(where, field, f"is {_shown(value)}; choose one of {', '.join(map(_shown, choices))}")
        return value
    if kind == "r":
        return _check_r(value, bounds, where, field)
    if kind == "int":
        if not _is_int(value):
            raise _fail(where, field, f"must be a whole number{_range_text(bounds)}, not {_shown(value)}")
        return _in_range(value, bounds, where, field)
    if kind == "float":
        if isinstance(value, list) and spec["name"] in PER_LAYER_FLOATS:
            if not value:
                raise _fail(where, field, "is an empty list; give a number or one per layer")
            return [_float(v, bounds, where, f"{field}[{i}]") for i, v in enumerate(value)]
        return _float(value, bounds, where, field)
    raise _fail(where, field, f"has a type this Merge Studio cannot check ({kind!r})")  # pragma: no cover


def _check_r(value: Any, bounds: Optional[tuple], where: Path, field: str) -> Any:
    form = "a whole number, a list of whole numbers (one per layer) or [r, inflection]"
    if _is_int(value):
        return _in_range(value, bounds, where, field)
    if not isinstance(value, list) or not value:
        raise _fail(where, field, f"must be {form}, not {_shown(value)}")
    if len(value) == 2 and isinstance(value[1], float):  # [r, inflection]: the inflection written as a decimal
        base, inflection = value
        if not _is_int(base):
            raise _fail(where, f"{field}[0]", f"must be a whole number (r of [r, inflection]), not {_shown(base)}")
        _in_range(base, bounds, where, f"{field}[0]")
        if not -1.0 <= inflection <= 1.0:
            raise _fail(where, f"{field}[1]", f"is {_shown(inflection)}; an inflection lies in [-1, 1]")
        return (base, inflection)
    for i, item in enumerate(value):
        if not _is_int(item):
            raise _fail(where, f"{field}[{i}]", f"must be a whole number (r of layer {i}), not {_shown(item)}")
        _in_range(item, bounds, where, f"{field}[{i}]")
    return list(value)


def _float(value: Any, bounds: Optional[tuple], where: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, field, f"must be a number{_range_text(bounds)}, not {_shown(value)}")
    return _in_range(value, bounds, where, field)


def _in_range(value: Any, bounds: Optional[tuple], where: Path, field: str) -> Any:
    low, high = bounds if bounds is not None else (None, None)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(where, field, f"is {_shown(value)}, outside the method's range{_range_text(bounds)}")
    return value


def _range_text(bounds: Optional[tuple]) -> str:
    if bounds is None or bounds == (None, None):
        return ""
    low, high = bounds
    if high is None:
        return f" (at least {_shown(low)})"
    if low is None:
        return f" (at most {_shown(high)})"
    return f" (from {_shown(low)} to {_shown(high)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (str, bool, list, dict)) or value is None else repr(value)


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _nearest(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- overrides


def with_overrides(preset: TokenPreset, options: dict) -> tuple[dict, list[dict]]:
    """The preset's options with ``options`` (e.g. from a command line) on top, and what they replaced.

    An option replaces the preset's value of the same name and the options it
    excludes in the method's schema (``threshold`` replaces the preset's ``r``).
    Returns the merged options and, per option that replaced something,
    ``{"option", "value", "replaces": {name: the preset's value}}``.
    """
    params = _method_specs().get(preset.method, {})
    merged, overridden = dict(preset.options), []
    for name, value in options.items():
        excluded = params[name]["exclusive"] if name in params else ()
        replaced = {key: merged[key] for key in (name, *excluded) if key in merged}
        for key in replaced:
            if key != name:
                del merged[key]
        if replaced:
            overridden.append({"option": name, "value": value, "replaces": replaced})
        merged[name] = value
    return merged, overridden


# ----------------------------------------------------------------------------- places and Python


def default_presets_dir() -> Path:
    """Where the app saves token presets: ``core.paths.home() / "presets" / "tokens"`` (created)."""
    from core import paths

    folder = paths.home() / "presets" / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shipped_presets() -> list[Path]:
    """The example presets of ``resources/presets/tokens/``, by name."""
    from core.resources import resource

    return sorted(resource("presets", "tokens").glob("*.json"))


def _python(value: Any) -> str:
    """A Python literal of an option value (strings in double quotes)."""
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid Python string literal
    if isinstance(value, tuple):
        items = [_python(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(_python(v) for v in value)}]"
    if isinstance(value, float) and not math.isfinite(value):
        raise PresetError(f"An option value {value!r} has no Python literal; use a finite number.")
    return repr(value)


def python_line(preset: TokenPreset) -> str:
    """The preset as one line of Python: ``core.tokens.apply(model, method="tome", r=13)``."""
    arguments = [f"method={_python(preset.method)}"]
    for name, value in preset.options.items():
        if not str(name).isidentifier():
            raise PresetError(f"The option name {name!r} cannot be a keyword argument of core.tokens.apply.")
        arguments.append(f"{name}={_python(value)}")
    return f"core.tokens.apply(model, {', '.join(arguments)})"


__all__ = [
    "PER_LAYER_FLOATS",
    "PRESET_FORMAT",
    "PRESET_VERSION",
    "PresetError",
    "TokenPreset",
    "default_presets_dir",
    "load_preset",
    "preset_dict",
    "python_line",
    "save_preset",
    "shipped_presets",
    "with_overrides",
]
