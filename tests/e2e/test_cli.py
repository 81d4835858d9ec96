"""The good paths of the ``mergestudio`` command, end to end on tiny models.

``check`` and ``methods`` print what they promise; ``merge`` writes a folder
that transformers (and, for pipelines, the diffusers layout) loads unchanged,
with its config, tokenizer, generation config, model card, mergekit recipe and
the recipe in the safetensors metadata; every input layout merges; sharded
output equals unsharded output byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import core.merge as merge
from core.cli import main
from tests.fixtures.tiny_models import read_state_dict

IDS = [[1, 5, 17, 42, 99, 7]]

MERGEKIT_METHODS = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
    "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock",
    "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
}
BEYOND_MERGEKIT = {"widen", "mwa"}  # methods from the papers that mergekit does not have
ALL_METHODS = MERGEKIT_METHODS | BEYOND_MERGEKIT


# ----------------------------------------------------------------------------- helpers


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*models: Path, weights: tuple[float, ...], **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **extra,
    }


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def merged(capsys, recipe: Path, output: Path, *extra) -> Path:
    code, out, err = run_cli(capsys, "merge", recipe, "-o", output, *extra)
    assert code == 0, err
    return output


def formula(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i x_i / sum_i w_i, in float64, written out."""
    total = sum(weights)
    return {
        name: (sum(w * s[name].double() for s, w in zip(states, weights)) / total).to(states[0][name].dtype)
        for name in states[0]
    }


def assert_state_close(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    for name, t in ref.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-6, msg=name)


def causal_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


# ----------------------------------------------------------------------------- check / methods


def test_check_prints_the_plan(llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(0.3, 0.7)))
    n_tensors = len(read_state_dict(llama_family["a"]))
    code, out, err = run_cli(capsys, "check", recipe, "-o", tmp_path / "out")
    assert code == 0 and err == ""
    assert "OK" in out
    assert f"Plan: {n_tensors} tensors ({n_tensors} linear)" in out
    assert "Linear (linear)" in out and "https://arxiv.org/abs/2203.05482" in out
    assert "4 output layers" in out
    for words in ("Output size:", "Peak memory (estimate):", "Free disk at the output:"):
        assert words in out, words
    assert str(llama_family["a"]) in out and str(llama_family["b"]) in out
    assert not (tmp_path / "out").exists()


def test_check_json(llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(0.3, 0.7)))
    state = read_state_dict(llama_family["a"])
    code, out, err = run_cli(capsys, "check", recipe, "-o", tmp_path / "out", "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    for key in ("method", "models", "tensors", "ops", "output_bytes", "peak_memory_bytes", "free_disk_bytes"):
        assert key in info, key
    assert info["method"] == "linear"
    assert info["tensors"] == len(state) and info["ops"] == {"linear": len(state)}
    assert info["output_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert info["input_bytes"] == 2 * info["output_bytes"]
    assert info["peak_memory_bytes"] > 0 and info["free_disk_bytes"] > 0
    assert [m["ref"] for m in info["models"]] == [str(llama_family["a"]), str(llama_family["b"])]
    assert all(m["layers"] == 4 and m["kind"] == "transformers" for m in info["models"])


def test_check_json_for_a_pipeline(diffusers_pipelines, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(diffusers_pipelines["a"], diffusers_pipelines["b"], weights=(0.3, 0.7)))
    code, out, err = run_cli(capsys, "check", recipe, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert {m["kind"] for m in info["models"]} == {"diffusers"}
    assert info["free_disk_bytes"] > 0  # no -o: the current folder is measured
    code, out, err = run_cli(capsys, "check", recipe)
    assert code == 0, err
    assert f"Plan: {info['tensors']} tensors" in out and "unet/conv_in.weight" in out


def test_methods_json_lists_every_method(capsys):
    code, out, err = run_cli(capsys, "methods", "--json")
    assert code == 0 and err == ""
    listing = json.loads(out)
    names = [m["name"] for m in listing]
    assert len(names) == len(set(names))
    assert ALL_METHODS <= set(names)  # all 20 of mergekit 0.1.5, and the ones beyond it
    for method in listing:
        # Every method cites its paper, except passthrough (layer stacking has none).
        assert method["paper"].startswith("https://") or method["name"] == "passthrough", method["name"]
        assert method["description"] and method["display_name"]
        assert method["base_model"] in ("required", "optional", "ignored")
        for p in method["parameters"]:
            where = f"{method['name']}.{p['name']}"
            for key in ("type", "default", "range", "help"):
                assert key in p, f"{where} has no {key}"
            assert p["type"] in ("float", "int", "bool", "str"), where
            assert p["help"].strip(), where
            assert isinstance(p["range"], str) and p["range"], where
            if p["required"]:
                assert p["default"] is None, where
            elif p["default"] is not None:
                kind = {"float": (int, float), "int": int, "bool": bool, "str": str}[p["type"]]
                assert isinstance(p["default"], kind), where
    ties = next(m for m in listing if m["name"] == "ties")
    density = next(p for p in ties["parameters"] if p["name"] == "density")
    assert density["range"] == "(0, 1]" and density["exclusive_minimum"] is True


def test_methods_text(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in ALL_METHODS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


# ----------------------------------------------------------------------------- merge: the export folder


def test_merge_json_with_the_console_script(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(0.3, 0.7)))
    exe = Path(sys.executable).with_name("mergestudio")
    exe = str(exe) if exe.exists() else shutil.which("mergestudio")
    output = tmp_path / "out"
    proc = subprocess.run(
        [exe, "merge", str(recipe), "-o", str(output), "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    assert set(result) >= {"output", "tensors", "bytes", "device", "files"}
    assert isinstance(result["seconds"], float)  # reported, never judged: timings live in bench/
    assert result["files"] == ["model.safetensors"] and result["device"] == "cpu"
    assert result["tensors"] == len(read_state_dict(llama_family["a"]))
    assert result["bytes"] == (output / "model.safetensors").stat().st_size - _header_size(output / "model.safetensors")


def _header_size(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_llama_export_folder(llama_family, tmp_path, capsys):
    from mergekit.config import MergeConfiguration
    from transformers import AutoTokenizer

    src = llama_family["a"]
    recipe_dict = linear(llama_family["a"], llama_family["b"], llama_family["c"], weights=(0.2, 0.3, 0.5), dtype="float32")
    recipe = write_recipe(tmp_path, recipe_dict)
    out = merged(capsys, recipe, tmp_path / "out")

    # Weights: the formula.
    states = [read_state_dict(llama_family[k]) for k in ("a", "b", "c")]
    assert_state_close(read_state_dict(out), formula(states, [0.2, 0.3, 0.5]))

    # config.json: the first model's; generation config and tokenizer copied.
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((src / "config.json").read_text())
    assert config == source_config
    assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    # README: the method, its paper and the models.
    card = (out / "README.md").read_text()
    assert "Linear" in card and "https://arxiv.org/abs/2203.05482" in card
    for k in ("a", "b", "c"):
        assert str(llama_family[k]) in card

    # mergekit_config.yml: reads back to the same recipe, here and in mergekit.
    text = (out / "mergekit_config.yml").read_text()
    assert merge.load_recipe(out / "mergekit_config.yml").to_dict() == merge.load_recipe(recipe).to_dict()
    MergeConfiguration.model_validate(yaml.safe_load(text))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["mergestudio_recipe"] == text

    # transformers loads it unchanged.
    logits = causal_logits(out)
    assert logits.shape == (1, len(IDS[0]), 256) and torch.isfinite(logits).all()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("hello world")["input_ids"] == AutoTokenizer.from_pretrained(str(src))("hello world")["input_ids"]
    assert leftovers(out) == []


def test_slices_update_the_layer_count(llama_family, tmp_path, capsys):
    from mergekit.config import MergeConfiguration

    recipe_dict = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama_family["a"]), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(llama_family["b"]), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    recipe = write_recipe(tmp_path, recipe_dict)
    out = merged(capsys, recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    state, a, b = read_state_dict(out), read_state_dict(llama_family["a"]), read_state_dict(llama_family["b"])
    assert torch.equal(state["model.layers.3.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(state["model.layers.4.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(state["model.layers.5.self_attn.o_proj.weight"], b["model.layers.2.self_attn.o_proj.weight"])
    assert "model.layers.6.mlp.up_proj.weight" not in state
    text = (out / "mergekit_config.yml").read_text()
    assert merge.load_recipe(out / "mergekit_config.yml").to_dict() == merge.load_recipe(recipe).to_dict()
    MergeConfiguration.model_validate(yaml.safe_load(text))
    assert causal_logits(out).shape == (1, len(IDS[0]), 256)


def test_sharded_output_equals_unsharded(llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(0.3, 0.7)))
    whole = merged(capsys, recipe, tmp_path / "whole")
    code, out, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "sharded", "--shard-size", "20KB", "--json")
    assert code == 0, err
    sharded = tmp_path / "sharded"
    files = json.loads(out)["files"]
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and [p.name for p in shards] == files
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)

    reference = {}
    with safe_open(str(whole / "model.safetensors"), "pt") as f:
        for key in f.keys():
            reference[key] = f.get_tensor(key)
    union: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                assert key not in union and index["weight_map"][key] == shard.name
                union[key] = f.get_tensor(key)
        data = shard.stat().st_size - _header_size(shard)
        assert data <= 20_000 or len(index_keys := [k for k, v in index["weight_map"].items() if v == shard.name]) == 1
    assert set(union) == set(reference)
    for key, t in reference.items():
        assert union[key].dtype == t.dtype and union[key].shape == t.shape
        assert union[key].numpy().tobytes() == t.numpy().tobytes(), key
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    assert torch.equal(causal_logits(whole), causal_logits(sharded))


def test_gpt2_tied_lm_head(gpt2_family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path, linear(gpt2_family["a"], gpt2_family["b"], weights=(0.4, 0.6)))
    out = merged(capsys, recipe, tmp_path / "out")
    states = [read_state_dict(gpt2_family[k]) for k in ("a", "b")]
    ours = read_state_dict(out)
    assert_state_close(ours, formula(states, [0.4, 0.6]))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.config.tie_word_embeddings is not False
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.transformer.wte.weight.detach(), ours["transformer.wte.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor(IDS)).logits).all()
    AutoTokenizer.from_pretrained(str(out))


def test_bert_linear_equals_the_formula(bert_family, tmp_path, capsys):
    """mergekit 0.1.5 crashes on BERT, so the formula written out here is the reference."""
    from transformers import AutoModel

    weights = (0.5, 0.25, 1.25)
    recipe = write_recipe(tmp_path, linear(bert_family["base"], bert_family["a"], bert_family["b"], weights=weights))
    out = merged(capsys, recipe, tmp_path / "out")
    x, a, b = (read_state_dict(bert_family[k]) for k in ("base", "a", "b"))
    ours = read_state_dict(out)
    assert set(ours) == set(x)
    for name in x:
        if not x[name].is_floating_point():
            assert torch.equal(ours[name], x[name]), name  # integer buffers come from the first model
            continue
        expected = (0.5 * x[name].double() + 0.25 * a[name].double() + 1.25 * b[name].double()) / 2.0
        torch.testing.assert_close(ours[name], expected.float(), rtol=1e-5, atol=1e-6, msg=name)
    model = AutoModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[1, 5, 6, 2]])).last_hidden_state
    assert torch.isfinite(hidden).all()


# ----------------------------------------------------------------------------- merge: input layouts


def test_sharded_input(llama_sharded, llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_sharded, llama_family["a"], weights=(0.3, 0.7)))
    out = merged(capsys, recipe, tmp_path / "out")
    states = [read_state_dict(llama_family["base"]), read_state_dict(llama_family["a"])]
    assert_state_close(read_state_dict(out), formula(states, [0.3, 0.7]))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    causal_logits(out)


def test_single_file_input(single_file_ckpt, llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], single_file_ckpt, weights=(0.3, 0.7)))
    code, out_text, err = run_cli(capsys, "check", recipe, "--json")
    assert code == 0, err
    kinds = [m["kind"] for m in json.loads(out_text)["models"]]
    assert kinds == ["transformers", "single_file"]
    out = merged(capsys, recipe, tmp_path / "out")
    states = [read_state_dict(llama_family["a"]), read_state_dict(llama_family["base"])]
    assert_state_close(read_state_dict(out), formula(states, [0.3, 0.7]))
    causal_logits(out)  # config and tokenizer come from the first model, a folder


def test_single_file_input_alone_gives_weights_without_config(single_file_ckpt, llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(single_file_ckpt, llama_family["a"], weights=(0.5, 0.5)))
    out = merged(capsys, recipe, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()
    states = [read_state_dict(llama_family["base"]), read_state_dict(llama_family["a"])]
    assert_state_close(read_state_dict(out), formula(states, [0.5, 0.5]))


def test_diffusers_pipelines(diffusers_pipelines, tmp_path, capsys):
    a, b = diffusers_pipelines["a"], diffusers_pipelines["b"]
    recipe = write_recipe(tmp_path, linear(a, b, weights=(0.3, 0.7)))
    out = merged(capsys, recipe, tmp_path / "out")
    assert json.loads((out / "model_index.json").read_text()) == json.loads((a / "model_index.json").read_text())
    for component, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        assert (out / component / "config.json").read_text() == (a / component / "config.json").read_text()
        ours = read_state_dict(out / component / file)
        sa, sb = read_state_dict(a / component / file), read_state_dict(b / component / file)
        assert set(ours) == set(sa), component
        for name in sa:
            torch.testing.assert_close(ours[name], 0.3 * sa[name] + 0.7 * sb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not list(out.glob("*.safetensors"))  # weights live in the component folders only


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_replaces_an_existing_output(llama_family, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "sentinel.txt").write_text("old")
    (output / "model.safetensors").write_bytes(b"old weights")
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(0.3, 0.7)))
    merged(capsys, recipe, output, "--overwrite")
    assert not (output / "sentinel.txt").exists()
    states = [read_state_dict(llama_family[k]) for k in ("a", "b")]
    assert_state_close(read_state_dict(output), formula(states, [0.3, 0.7]))
    assert leftovers(output) == []


def test_card_of_a_method_without_a_paper_has_no_empty_link(llama_family, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llama_family["a"]), "layer_range": [0, 2]}]}]},
    )
    card = (merged(capsys, recipe, tmp_path / "out") / "README.md").read_text()
    assert "Passthrough" in card and "]()" not in card


def test_relative_model_paths_and_hub_ids(llama_family, tmp_path, capsys, monkeypatch):
    """A recipe names models relative to its own folder, or by Hub id from the local cache."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--tiny-org--tiny-llama-b" / "snapshots" / "abc123"
    shutil.copytree(llama_family["b"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    recipes = tmp_path / "recipes"
    shutil.copytree(llama_family["a"], recipes / "models" / "tiny-a")
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "models/tiny-a", "parameters": {"weight": 0.3}},
            {"model": "tiny-org/tiny-llama-b", "parameters": {"weight": 0.7}},
        ],
    }
    path = write_recipe(recipes, recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = merged(capsys, path, tmp_path / "out")
    states = [read_state_dict(llama_family[k]) for k in ("a", "b")]
    assert_state_close(read_state_dict(out), formula(states, [0.3, 0.7]))
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == recipe  # refs kept as written
