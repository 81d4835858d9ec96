"""``mergestudio methods``, ``check`` and ``merge`` on Stable Diffusion recipes, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from core.cli import main
from tests.fixtures import sd_checkpoints as F


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return F.make_sd_set(tmp_path_factory.getbasetemp() / "sd-set")  # one set per session


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weighted(a: Path, b: Path, alpha) -> dict:
    return {"merge_method": "weighted_sum", "models": [{"model": str(a)}, {"model": str(b)}],
            "parameters": {"alpha": alpha}}


def test_methods_list_the_a1111_modes_with_their_direction(capsys):
    code, out, err = run_cli(capsys, "methods")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert any(line.startswith("weighted_sum ") and "wiki/Features#checkpoint-merger" in line for line in lines)
    assert any("alpha" in line and "0.3 = 30 % of model B" in line for line in lines)
    assert any("multiplier" in line and "adds multiplier × (B − C) to A" for line in lines)
    assert any(line.startswith("convert ") for line in lines)
    code, out, _ = run_cli(capsys, "methods", "--json")
    listing = {m["name"]: m for m in json.loads(out)}
    assert listing["add_difference"]["min_models"] == listing["add_difference"]["max_models"] == 3
    assert listing["weighted_sum"]["parameters"][0]["slider"] == [0.0, 1.0]
    assert listing["weighted_sum"]["parameters"][0]["range"] == "any value"


def test_check_prints_the_architecture_and_the_block_weights(ckpts, tmp_path, capsys):
    alpha = {"blocks": {"BASE": 0.2, "IN00": 0.5, "OUT11": 0.9}, "default": 0.4}
    recipe = write(tmp_path, weighted(ckpts["sd1_inpaint"], ckpts["sd1_b"], alpha))
    code, out, err = run_cli(capsys, "check", recipe)
    assert code == 0, err
    assert "SD 1.x inpainting (9-channel UNet), single file: UNet, text encoder, VAE" in out
    assert "Inpainting merge: model A's 9-channel first convolution" in out
    assert "Block weights (sd1):" in out and "alpha: BASE=0.2 IN00=0.5 IN01=0.4" in out and "OUT11=0.9 VAE=0.2" in out
    code, out, err = run_cli(capsys, "check", recipe, "--json")
    info = json.loads(out)
    assert info["stable_diffusion"]["kind"] == "sd1" and info["stable_diffusion"]["inpainting_merge"] is True
    assert info["models"][0]["stable_diffusion"]["in_channels"] == 9
    assert info["block_weights"]["parameters"]["alpha"]["OUT11"] == 0.9


def test_merge_writes_one_file(ckpts, tmp_path, capsys):
    recipe = write(tmp_path, weighted(ckpts["sd1_a"], ckpts["sd1_b"], 0.3))
    out = tmp_path / "mix.safetensors"
    code, stdout, err = run_cli(capsys, "merge", recipe, "-o", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["files"] == ["mix.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.safetensors", "recipe.yaml"]
    a, b, merged = load_file(ckpts["sd1_a"]), load_file(ckpts["sd1_b"]), load_file(out)
    name = "model.diffusion_model.middle_block.1.proj_in.weight"
    torch.testing.assert_close(merged[name], (a[name].float() * 0.7 + b[name].float() * 0.3).half())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sd_merge_recipe"])["interp_method"] == "Weighted sum"
    assert json.loads(meta["sd_merge_recipe"])["multiplier"] == 0.3
    assert "mergestudio_recipe" in meta and len(json.loads(meta["sd_merge_models"])) == 2


def test_convert_with_options_from_yaml(ckpts, tmp_path, capsys):
    recipe = write(tmp_path, {"merge_method": "convert", "models": [{"model": str(ckpts["sd1_ema_a"])}],
                              "out_dtype": "bf16", "ema": "use", "vae": str(ckpts["vae"]), "drop": "position_ids$"})
    code, out, err = run_cli(capsys, "check", recipe)
    assert code == 0, err
    assert "[VAE baked in]" in out and "Options: VAE baked in from" in out and "ema use" in out
    code, _, err = run_cli(capsys, "merge", recipe, "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    merged = load_file(tmp_path / "c.safetensors")
    assert all(t.dtype == torch.bfloat16 for n, t in merged.items() if t.is_floating_point())
    assert not any(n.startswith("model_ema.") or n.endswith("position_ids") for n in merged)


@pytest.mark.parametrize(
    "alpha, model, words",
    [
        ({"blocks": {"IN12": 0.5}}, "sd1_b", ["parameters.alpha.blocks: 'IN12' is not a block of SD 1.x"]),
        ({"blocks": "0.1,0.2,0.3"}, "sd1_b", ["3 values given", "SD 1.x takes 26"]),
        (0.5, "sdxl_a", ["is SDXL", "is SD 1.x: they cannot be merged"]),
    ],
)
def test_bad_sd_recipes_fail_in_one_line(ckpts, tmp_path, capsys, alpha, model, words):
    recipe = write(tmp_path, weighted(ckpts["sd1_a"], ckpts[model], alpha))
    for command in (["check", recipe], ["merge", recipe, "-o", tmp_path / "o.safetensors"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 1 and len(err.splitlines()) == 1, err
        for word in words:
            assert word in err
    assert not (tmp_path / "o.safetensors").exists()


def test_block_weights_on_a_non_sd_model(llama_family, tmp_path, capsys):
    recipe = write(tmp_path, weighted(llama_family["a"], llama_family["b"], {"blocks": {"IN00": 0.5}}))
    code, _, err = run_cli(capsys, "check", recipe)
    assert code == 1 and "block weights apply to Stable Diffusion checkpoints only" in err
    assert f"model '{llama_family['a']}' is not one" in err
