"""core.tokens.presets: token presets in JSON (load, save, checks against methods(), Python line).

Files under tmp_path; the checks are compared with the engine's own schema
(``core.tokens.methods()``); the Python line is executed on a small random ViT.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import MergeStudioError
from core.tokens.presets import (
    PRESET_FORMAT,
    PresetError,
    TokenPreset,
    default_presets_dir,
    load_preset,
    preset_dict,
    python_line,
    save_preset,
    shipped_presets,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def preset_file(tmp_path: Path, method: str = "tome", options=None, **extra) -> Path:
    data = {"format": PRESET_FORMAT, "version": 1, "method": method, "options": options or {}, **extra}
    return write(tmp_path / "p.json", data)


def one_sentence(exc: BaseException, *names: object) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("."), text
    assert "Traceback" not in text, text
    for name in names:
        assert str(name) in text, text
    return text


# ----------------------------------------------------------------------------- shipped examples


def test_the_shipped_presets_load():
    presets = {path.name: load_preset(path) for path in shipped_presets()}
    assert sorted(presets) == [
        "todo-sd15-factor2.json", "tome-text-threshold.json", "tome-vit-r13.json", "tomesd-sd15-ratio0.5.json"
    ]  # fmt: skip
    assert presets["tome-vit-r13.json"] == TokenPreset(
        "tome", {"r": 13}, presets["tome-vit-r13.json"].model, presets["tome-vit-r13.json"].note
    )
    assert presets["tome-text-threshold.json"].options == {"threshold": 0.9}
    assert presets["tomesd-sd15-ratio0.5.json"].method == "tomesd"
    assert presets["tomesd-sd15-ratio0.5.json"].options["ratio"] == 0.5
    assert presets["todo-sd15-factor2.json"].options["downsample_factor"] == 2
    for path, preset in zip(shipped_presets(), presets.values()):
        assert preset.model and preset.note, path
        assert json.loads(path.read_text(encoding="utf-8")) == preset_dict(preset), path  # the file is the dict
        ast.parse(python_line(preset))


# ----------------------------------------------------------------------------- save and load


@pytest.mark.parametrize(
    "preset",
    [
        TokenPreset("tome", {"r": 13}),
        TokenPreset("tome", {"r": (13, -1.0), "prop_attn": False}, model="/models/vit", note="decreasing"),
        TokenPreset("tome", {"r": (8, 0)}),  # a whole-number inflection is still a pair
        TokenPreset("tome", {"r": [4, 4, 2]}),
        TokenPreset("tome", {"r": [4, 2]}),  # two layers, not a pair
        TokenPreset("tome", {"threshold": [0.9, 0.8, -1]}),
        TokenPreset("pitome", {"r": 4, "margin": None, "alpha": 0.5}),
        TokenPreset("tomesd", {"ratio": 0.9, "sx": 4, "sy": 4, "max_downsample": 2, "seed": 2**64 - 1}),
        TokenPreset("todo", {"downsample_factor": 3, "downsample_method": "avg_pool"}, note="ünïcode"),
        TokenPreset("tome", {}),
    ],
)
def test_save_then_load_gives_the_preset_back(tmp_path, preset):
    path = save_preset(tmp_path / "p.json", preset)
    assert path == tmp_path / "p.json" and [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") > 4  # pretty
    data = json.loads(text)
    assert list(data)[:4] == ["format", "version", "method", "options"] and data == preset_dict(preset)
    assert ("model" in data) == (preset.model is not None) and ("note" in data) == (preset.note is not None)
    loaded = load_preset(path)
    expected = dict(preset.options)
    if isinstance(expected.get("r"), tuple):
        expected["r"] = (expected["r"][0], float(expected["r"][1]))
    assert loaded == TokenPreset(preset.method, expected, preset.model, preset.note)
    assert type(loaded.options.get("r")) is type(preset.options.get("r"))  # a pair stays a pair, a list a list


def test_a_pair_is_written_with_a_decimal_inflection(tmp_path):
    path = save_preset(tmp_path / "p.json", TokenPreset("tome", {"r": (13, -1)}))
    assert '"r": [\n      13,\n      -1.0\n    ]' in path.read_text(encoding="utf-8")
    assert load_preset(path).options == {"r": (13, -1.0)}


def test_save_replaces_atomically_and_refuses_what_would_not_load(tmp_path):
    path = save_preset(tmp_path / "p.json", TokenPreset("tome", {"r": 2}))
    before = path.read_bytes()
    for bad in (
        TokenPreset("tome", {"r": -1}),
        TokenPreset("tome", {"threshold": float("nan")}),
        TokenPreset("tome", {"r": 2, "threshold": 0.5}),
        TokenPreset("nope", {}),
    ):
        with pytest.raises(PresetError) as refused:
            save_preset(path, bad)
        one_sentence(refused.value, path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    save_preset(path, TokenPreset("tome", {"r": 3}))
    assert load_preset(path).options == {"r": 3}

    with pytest.raises(PresetError) as no_folder:
        save_preset(tmp_path / "missing" / "p.json", TokenPreset("tome", {"r": 2}))
    one_sentence(no_folder.value, tmp_path / "missing", "does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(PresetError) as folder:
        save_preset(tmp_path / "folder.json", TokenPreset("tome", {"r": 2}))
    one_sentence(folder.value, tmp_path / "folder.json")


# ----------------------------------------------------------------------------- bad files


def test_unreadable_files_are_one_sentence(tmp_path):
    cases = {
        "missing": (tmp_path / "missing.json", "cannot be read"),
        "folder": (tmp_path, "cannot be read"),
        "not json": (write(tmp_path / "a.json", '{"format": '), "not valid JSON"),
        "not utf-8": (tmp_path / "b.json", "UTF-8"),
        "a list": (write(tmp_path / "c.json", [1, 2]), "JSON object, not a JSON list"),
    }
    cases["not utf-8"][0].write_bytes(b'{"note": "\xff"}')
    for name, (path, words) in cases.items():
        with pytest.raises(PresetError) as bad:
            load_preset(path)
        assert isinstance(bad.value, MergeStudioError)
        one_sentence(bad.value, path, words)


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"format": "mergekit"}, "format", "'mergekit'"),
        ({"format": None}, "format", PRESET_FORMAT),
        ({"version": 2}, "version", "reads version 1"),
        ({"version": True}, "version", "True"),
        ({"method": "tomee"}, "method", "did you mean 'tome'?"),
        ({"method": "fancy"}, "method", "tome, pitome, tomesd, todo"),
        ({"method": 3}, "method", "method name"),
        ({"options": [13]}, "options", "JSON object"),
        ({"modle": "x"}, "modle", "did you mean 'model'?"),
        ({"model": ""}, "model", "text"),
        ({"note": 5}, "note", "text"),
    ],
)
def test_bad_fields_name_the_file_and_the_field(tmp_path, change, field, words):
    data = {"format": PRESET_FORMAT, "version": 1, "method": "tome", "options": {"r": 2}, **change}
    data = {k: v for k, v in data.items() if not (k == "format" and v is None)}
    path = write(tmp_path / "p.json", data)
    with pytest.raises(PresetError) as bad:
        load_preset(path)
    one_sentence(bad.value, path, f"field '{field}'", words)


@pytest.mark.parametrize(
    "method, options, field, words",
    [
        ("tome", {"treshold": 0.9}, "options.treshold", "did you mean 'threshold'?"),
        ("tome", {"ratio": 0.5}, "options.ratio", "not an option of method 'tome'"),
        ("tome", {"r": -1}, "options.r", "at least 0"),
        ("tome", {"r": 2.5}, "options.r", "whole number"),
        ("tome", {"r": True}, "options.r", "whole number"),
        ("tome", {"r": "13"}, "options.r", "[r, inflection]"),
        ("tome", {"r": []}, "options.r", "[r, inflection]"),
        ("tome", {"r": [4, 2.5, 1]}, "options.r[1]", "layer 1"),
        ("tome", {"r": [4, -2]}, "options.r[1]", "at least 0"),
        ("tome", {"r": [13, -1.5]}, "options.r[1]", "[-1, 1]"),
        ("tome", {"r": [1.5, -1.0]}, "options.r[0]", "whole number"),
        ("tome", {"r": None}, "options.r", "the default is 8"),
        ("tome", {"r": 2, "threshold": 0.9}, "options.r", "together with options.threshold"),
        ("tome", {"threshold": 1.5}, "options.threshold", "from -1 to 1"),
        ("tome", {"threshold": [0.9, 2]}, "options.threshold[1]", "from -1 to 1"),
        ("tome", {"threshold": []}, "options.threshold", "empty list"),
        ("tome", {"threshold": "high"}, "options.threshold", "must be a number"),
        ("tome", {"prop_attn": 1}, "options.prop_attn", "true or false"),
        ("pitome", {"r": 2, "margin": [0.5]}, "options.margin", "must be a number"),
        ("pitome", {"r": 2, "alpha": -0.1}, "options.alpha", "at least 0"),
        ("tomesd", {"ratio": 0.8}, "options.ratio", "from 0 to 0.75"),
        ("tomesd", {"ratio": 0.6, "sx": 2, "sy": 1}, "options.ratio", "from 0 to 0.5"),
        ("tomesd", {"ratio": 0.5, "sx": 0}, "options.sx", "at least 1"),
        ("tomesd", {"sx": 2.0}, "options.sx", "whole number"),
        ("tomesd", {"max_downsample": 3}, "options.max_downsample", "1, 2, 4, 8"),
        ("tomesd", {"seed": 2**64}, "options.seed", "outside the method's range"),
        ("todo", {"downsample_factor": 0}, "options.downsample_factor", "at least 1"),
        ("todo", {"downsample_method": "nearest"}, "options.downsample_method", '"nearest-exact"'),
    ],
)
def test_bad_options_name_the_file_and_the_option(tmp_path, method, options, field, words):
    path = preset_file(tmp_path, method, options)
    with pytest.raises(PresetError) as bad:
        load_preset(path)
    one_sentence(bad.value, path, f"field '{field}'", words)


def test_the_checks_follow_the_engines_schema(tmp_path):
    from core.tokens import methods

    for method in methods():
        for param in method["parameters"]:
            if param["default"] is None:
                continue
            path = preset_file(tmp_path, method["name"], {param["name"]: param["default"]})
            assert load_preset(path).options == {param["name"]: param["default"]}
            low = (param["range"] or [None])[0]
            if param["type"] in ("int", "r", "float") and low is not None:
                below = low - 1 if param["type"] != "float" else low - 0.5
                with pytest.raises(PresetError):
                    load_preset(preset_file(tmp_path, method["name"], {param["name"]: below}))


# ----------------------------------------------------------------------------- overrides


def test_overrides_replace_the_same_option_and_the_ones_it_excludes():
    preset = TokenPreset("tome", {"r": (13, -1.0), "prop_attn": False})
    assert with_overrides(preset, {}) == ({"r": (13, -1.0), "prop_attn": False}, [])
    merged, changes = with_overrides(preset, {"r": 4, "protect_cls": False})
    assert merged == {"r": 4, "prop_attn": False, "protect_cls": False}
    assert changes == [{"option": "r", "value": 4, "replaces": {"r": (13, -1.0)}}]
    merged, changes = with_overrides(preset, {"threshold": 0.9})
    assert merged == {"prop_attn": False, "threshold": 0.9}
    assert changes == [{"option": "threshold", "value": 0.9, "replaces": {"r": (13, -1.0)}}]
    assert preset.options == {"r": (13, -1.0), "prop_attn": False}  # the preset itself is unchanged
    merged, changes = with_overrides(TokenPreset("pitome", {"r": 4}), {"threshold": 0.9})  # pitome: no exclusion
    assert merged == {"r": 4, "threshold": 0.9} and changes == []  # (apply refuses threshold for pitome)


# ----------------------------------------------------------------------------- python line, folders


def test_python_line_runs_on_a_small_vit():
    import torch

    import core.tokens
    from core.tokens import tiny

    model = tiny.build("vit", size="small").model
    pixels = torch.randn(2, 3, 32, 32)
    for preset, tokens in (
        (TokenPreset("tome", {"r": 2}), [17, 15, 13]),
        (TokenPreset("tome", {"r": (4, -1.0), "prop_attn": False}), [17, 9, 5]),
        (TokenPreset("tome", {"r": [1, 0, 3]}), [17, 16, 16]),
    ):
        line = python_line(preset)
        scope = {"core": core, "model": model}
        exec(f"handle = {line}", scope)
        handle = scope["handle"]
        try:
            assert handle.active and handle.method == preset.method
            with torch.inference_mode():
                model(pixel_values=pixels)
            assert handle.stats["tokens_per_layer"] == tokens, line
        finally:
            handle.remove()
    assert python_line(TokenPreset("tome", {"r": 13})) == 'core.tokens.apply(model, method="tome", r=13)'
    assert python_line(TokenPreset("tome", {"r": (13, -1.0), "threshold": None})) == (
        'core.tokens.apply(model, method="tome", r=(13, -1.0), threshold=None)'
    )
    todo = python_line(TokenPreset("todo", {"downsample_method": "avg_pool", "max_downsample": None}))
    assert todo == 'core.tokens.apply(model, method="todo", downsample_method="avg_pool", max_downsample=None)'


def test_default_presets_dir_is_created_under_home(fresh_home):
    folder = default_presets_dir()
    assert folder == fresh_home / "presets" / "tokens" and folder.is_dir()
    saved = save_preset(folder / "mine.json", TokenPreset("tome", {"r": 4}))
    assert load_preset(saved).options == {"r": 4}


def test_loading_a_preset_does_not_import_torch():
    code = (
        "import sys\nfrom core.tokens.presets import load_preset, shipped_presets, python_line\n"
        "lines = [python_line(load_preset(p)) for p in shipped_presets()]\n"
        "print(len(lines), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "False"]
