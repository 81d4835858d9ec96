"""``mergestudio tokens bench --preset FILE`` end to end on the small random ViT.

Driven in-process through ``core.cli.main`` (one warm-up-free timed run each way:
fast). Timings are not asserted; the options the bench ran with, the report's
preset lines and the errors are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main
from core.tokens.presets import PresetError, TokenPreset, load_preset, save_preset, shipped_presets

pytest.importorskip("transformers")

FAST = ("--tiny", "vit", "--tiny-size", "small", "--runs", "1", "--warmup", "0", "--device", "cpu", "--threads", "1")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main(["tokens", "bench", *FAST, *(str(a) for a in args)])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bench_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(code, err, status, *words) -> str:
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def preset(tmp_path) -> Path:
    return save_preset(tmp_path / "tome-r2.json", TokenPreset("tome", {"r": 2, "prop_attn": True}, note="small ViT"))


def test_the_preset_gives_method_and_options(capsys, preset):
    result = bench_json(capsys, "--preset", preset)
    assert result["method"] == "tome" and result["options"] == {"r": 2, "prop_attn": True}
    assert result["tokens_per_layer"] == [17, 15, 13] and result["output_tokens"] == 11
    assert result["preset"] == {
        "path": str(preset), "method": "tome", "options": {"r": 2, "prop_attn": True}, "overridden": []
    }  # fmt: skip
    assert bench_json(capsys, "--preset", preset, "--method", "tome")["options"] == {"r": 2, "prop_attn": True}


def test_the_command_line_overrides_the_preset(capsys, preset):
    code, out, err = run_cli(capsys, "--preset", preset, "--r", "3", "--prop_attn", "false")
    assert code == 0, err
    lines = out.splitlines()
    assert "Method:   tome (r=3, prop_attn=False)" in lines
    assert f"Preset:   {preset} (tome: r=2, prop_attn=True)" in lines
    overrides = {line.strip() for line in lines if "(overrides the preset)" in line}
    assert overrides == {
        "r=3 from the command line (overrides the preset); the preset has r=2",
        "prop_attn=False from the command line (overrides the preset); the preset has prop_attn=True",
    }
    result = bench_json(capsys, "--preset", preset, "--r", "3")
    assert result["options"] == {"r": 3, "prop_attn": True} and result["tokens_per_layer"] == [17, 14, 11]
    assert result["preset"]["overridden"] == [{"option": "r", "value": 3, "replaces": {"r": 2}}]


def test_a_command_line_option_replaces_the_presets_exclusive_one(capsys, preset):
    result = bench_json(capsys, "--preset", preset, "--threshold", "0.95")
    assert result["options"] == {"prop_attn": True, "threshold": 0.95}  # r gave way to threshold
    assert result["preset"]["overridden"] == [{"option": "threshold", "value": 0.95, "replaces": {"r": 2}}]
    code, out, _ = run_cli(capsys, "--preset", preset, "--threshold", "0.95")
    assert code == 0 and "threshold=0.95 from the command line (overrides the preset); the preset has r=2" in out


def test_an_option_only_on_the_command_line_is_added(capsys, preset):
    result = bench_json(capsys, "--preset", preset, "--trace_source", "true")
    assert result["options"] == {"r": 2, "prop_attn": True, "trace_source": True}
    assert result["preset"]["overridden"] == []


def test_a_shipped_preset_runs(capsys):
    (threshold,) = [p for p in shipped_presets() if p.name == "tome-text-threshold.json"]
    result = bench_json(capsys, "--preset", threshold)
    assert result["options"] == {"threshold": 0.9} and result["stats"]["mode"] == "threshold"


def test_a_different_method_is_a_usage_error(capsys, preset):
    code, out, err = run_cli(capsys, "--preset", preset, "--method", "pitome")
    assert out == ""
    one_line_error(code, err, 2, "--method pitome", str(preset), "(tome)")


def test_a_bad_preset_is_status_1_with_the_loaders_sentence(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mergestudio-tokens-preset", "version": 1, "method": "tome",
                               "options": {"r": 2, "treshold": 0.9}}), encoding="utf-8")  # fmt: skip
    with pytest.raises(PresetError) as expected:
        load_preset(bad)
    code, out, err = run_cli(capsys, "--preset", bad)
    assert out == ""
    assert one_line_error(code, err, 1) == f"mergestudio: error: {expected.value}"
    code, _, err = run_cli(capsys, "--preset", tmp_path / "missing.json")
    one_line_error(code, err, 1, str(tmp_path / "missing.json"), "cannot be read")


def test_a_preset_too_strong_for_the_model_is_the_engines_sentence(capsys):
    (r13,) = [p for p in shipped_presets() if p.name == "tome-vit-r13.json"]
    code, _, err = run_cli(capsys, "--preset", r13)
    one_line_error(code, err, 1, "r=13 at layer 0", "8 tokens")
