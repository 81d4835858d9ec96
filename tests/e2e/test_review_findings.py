"""Regression tests for defects found in review (one test per finding).

Each bad input must give exit status 1, exactly one line on stderr naming the
file, tensor or field at fault (never "internal error"), and leave no output
or hidden ``.NAME.partial-*`` folder behind.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import core.merge as merge
from core.cli import main
from core.errors import MergeStudioError
from core.io.tensors import read_header
from core.jobs import Progress, TerminalProgress
from core.merge.recipe import recipe_from_dict


def _write(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _linear(*models, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models], **extra}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails_cleanly(capsys, tmp_path: Path, recipe: dict, names: list[str], command: str = "merge") -> str:
    path = _write(tmp_path, recipe)
    out = tmp_path / "out"
    args = [command, str(path)] + (["-o", str(out)] if command == "merge" else [])
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mergestudio: error: ") and "internal error" not in lines[0], lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return lines[0]


# -- a base_model in a `models:` recipe is one of the inputs, as in mergekit -------------


def test_linear_with_base_model_averages_the_base_too(llama_family, tmp_path):
    """mergekit appends base_model to the inputs of every method (linear included)."""
    fam = llama_family
    recipe = {
        "merge_method": "linear",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"])}, {"model": str(fam["b"])}],
        "parameters": {"weight": 0.5},
    }
    merge.run(_write(tmp_path, recipe), tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    ins = [load_file(fam[k] / "model.safetensors") for k in ("a", "b", "base")]
    name = "model.layers.1.mlp.up_proj.weight"
    expected = (ins[0][name] + ins[1][name] + ins[2][name]) / 3
    torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7)


def test_linear_base_model_without_weight_is_named(llama_family, tmp_path, capsys):
    fam = llama_family
    recipe = {**_linear(fam["a"], fam["b"]), "base_model": str(fam["base"])}
    _fails_cleanly(capsys, tmp_path, recipe, [str(fam["base"]), "'weight'", "required"])


def test_passthrough_with_base_model_counts_the_base(llama_family, tmp_path, capsys):
    fam = llama_family
    recipe = {"merge_method": "passthrough", "base_model": str(fam["base"]), "models": [{"model": str(fam["a"])}]}
    _fails_cleanly(capsys, tmp_path, recipe, ["passthrough", "exactly 1", "base model included", "gives 2"])


# -- JSON files of the wrong shape name the file ------------------------------------------


def test_config_json_that_is_not_an_object(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["a"], tmp_path / "bad")
    (bad / "config.json").write_text("[1, 2]")
    _fails_cleanly(capsys, tmp_path, _linear(bad, llama_family["b"]), [str(bad / "config.json"), "JSON object"])


def test_index_with_a_non_string_shard_name(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["a"], tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 5}}))
    _fails_cleanly(capsys, tmp_path, _linear(bad, llama_family["b"]), [str(bad / "model.safetensors.index.json"), "'lm_head.weight'"])


def test_model_index_json_that_is_not_an_object(llama_family, tmp_path, capsys):
    bad = tmp_path / "pipe"
    bad.mkdir()
    (bad / "model_index.json").write_text("[1]")
    _fails_cleanly(capsys, tmp_path, _linear(bad, llama_family["b"]), [str(bad / "model_index.json"), "JSON object"])


def test_broken_tokenizer_config_with_chat_template_fails_in_preflight(llama_family, tmp_path, capsys):
    """Setting a chat template rewrites tokenizer_config.json: a broken one is named before any weight is read."""
    bad = _copy(llama_family["a"], tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text("{broken")
    recipe = _linear(bad, llama_family["b"], chat_template="chatml")
    names = [str(bad / "tokenizer_config.json"), "JSON"]
    _fails_cleanly(capsys, tmp_path, recipe, names, command="check")
    _fails_cleanly(capsys, tmp_path, recipe, names)


# -- recipe values mergekit would not load ---------------------------------------------------


@pytest.mark.parametrize(
    "value, words",
    [
        ([[1, 2], [3]], ["unsupported value"]),
        ({"filter": "mlp", "value": [{"filter": "up", "value": 1}]}, ["unsupported value"]),
        ({"value": {"value": 1}}, ["unsupported value"]),
        ([{"filter": 3, "value": 1}], ["'filter'", "3"]),
    ],
)
def test_setting_outside_mergekit_grammar_is_refused(value, words):
    recipe = {"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": value}}]}
    with pytest.raises(MergeStudioError) as info:
        recipe_from_dict(recipe)
    message = str(info.value)
    assert "models[0].parameters.weight" in message and "\n" not in message
    assert all(w in message for w in words), message


def test_settings_mergekit_accepts_still_load():
    for value in (0.5, [0.1, 0.9], {"value": 1}, [{"filter": "mlp", "value": [0, 1]}, {"filter": None, "value": 2}]):
        recipe_from_dict({"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": value}}]})


def test_tokenizer_field_that_is_not_a_mapping(llama_family, tmp_path, capsys):
    recipe = _linear(llama_family["a"], llama_family["b"], tokenizer="union")
    _fails_cleanly(capsys, tmp_path, recipe, ["'tokenizer'", "mapping"])


# -- tensors that cannot be merged are refused, not silently copied -------------------------


def test_float8_tensor_is_refused_not_copied(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["a"], tmp_path / "fp8")
    state = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    _fails_cleanly(capsys, tmp_path, _linear(llama_family["b"], bad), [f"'{name}'", str(bad), "F8_E4M3"])


# -- malformed safetensors headers are ModelErrors naming the file --------------------------


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}, ["negative dimension"]),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, ["unsupported dtype"]),
    ],
)
def test_malformed_header_entry(entry, words, tmp_path):
    raw = json.dumps({"x": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(MergeStudioError) as info:
        read_header(path)
    assert str(path) in str(info.value) and "'x'" in str(info.value)
    assert all(w in str(info.value) for w in words)


# -- the Python API does not silently replace a bad shard size --------------------------------


def test_run_refuses_a_zero_shard_size(llama_family, tmp_path):
    with pytest.raises(MergeStudioError, match="shard-size"):
        merge.run(_write(tmp_path, _linear(llama_family["a"], llama_family["b"])), tmp_path / "out", device="cpu", shard_size=0)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- an error after a progress bar starts on a clean line ------------------------------------


def test_terminal_progress_clear_erases_an_unfinished_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = TerminalProgress(stream)
    bar(Progress(1, 3, 10, 30, 0.5))
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
    done = Tty()
    bar = TerminalProgress(done)
    bar(Progress(3, 3, 30, 30, 1.0))
    bar.clear()  # a finished bar ended its line: nothing to erase
    assert done.getvalue().endswith("\n")


# -- a training checkpoint folder: the weights file, not optimizer.pt --------------------------


def test_pickle_folder_prefers_the_weights_over_optimizer_state(llama_family, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-500"
    ckpt.mkdir()
    shutil.copy2(llama_family["a"] / "config.json", ckpt / "config.json")
    torch.save(load_file(llama_family["a"] / "model.safetensors"), ckpt / "pytorch_model.bin")
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, ckpt / "optimizer.pt")
    recipe = _linear(ckpt, llama_family["b"])
    line = _fails_cleanly(capsys, tmp_path, recipe, [str(ckpt / "pytorch_model.bin"), "--allow-pickle"])
    assert "optimizer.pt" not in line
    merge.run(_write(tmp_path, recipe), tmp_path / "out", device="cpu", allow_pickle=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    recipe = _linear(ckpt / "optimizer.pt", llama_family["b"])
    with pytest.raises(MergeStudioError, match="holds no tensors"):
        merge.check(_write(tmp_path, recipe), allow_pickle=True)


# -- dtype spellings: mergekit's 'torch.' prefix is read; exports use mergekit's names --------


def test_dtype_spellings_round_trip_through_mergekit(llama_family, tmp_path):
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration

    recipe = _linear(llama_family["a"], llama_family["b"], dtype="torch.float16", out_dtype="bf16")
    merge.run(_write(tmp_path, recipe), tmp_path / "out", device="cpu")
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    exported = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert (exported["dtype"], exported["out_dtype"]) == ("float16", "bfloat16")
    config = MergeConfiguration.model_validate(exported)
    assert dtype_from_name(config.dtype) == torch.float16 and dtype_from_name(config.out_dtype) == torch.bfloat16


# -- a merged pipeline's model card names diffusers --------------------------------------------


def test_pipeline_model_card_names_diffusers(diffusers_pipelines, tmp_path):
    recipe = _linear(diffusers_pipelines["a"], diffusers_pipelines["b"])
    merge.run(_write(tmp_path, recipe), tmp_path / "out", device="cpu")
    front = (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["library_name"] == "diffusers"


# -- --overwrite never deletes the merge's own inputs ------------------------------------------


@pytest.mark.parametrize("where", ["parent", "same"])
def test_overwrite_refuses_an_output_that_holds_an_input(where, llama_family, tmp_path, capsys):
    parent = tmp_path / "models"
    parent.mkdir()
    model = _copy(llama_family["a"], parent / "a")
    output = parent if where == "parent" else model
    path = _write(tmp_path, _linear(model, llama_family["b"]))
    code = main(["merge", str(path), "-o", str(output), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert str(output) in err and str(model) in err and "internal error" not in err
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert not [p for p in output.parent.iterdir() if ".partial-" in p.name]
