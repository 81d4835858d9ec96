"""Recognising SD checkpoints from their keys, and refusing what cannot be merged before any read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import core.merge as merge
from core.errors import ModelError, RecipeError
from core.io import sd
from core.io.catalog import describe_model
from core.io.formats import open_model
from core.merge.recipe import recipe_from_dict
from tests.fixtures import sd_checkpoints as F


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return F.make_sd_set(tmp_path_factory.getbasetemp() / "sd-set")  # one set per session


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {kind: F.make_pipeline(root / kind, kind, seed=1) for kind in F.KINDS}


def _info(path: Path) -> sd.SDInfo:
    source = open_model(path)
    try:
        info = sd.detect_source(source)
        assert info is not None
        return info
    finally:
        source.close()


@pytest.mark.parametrize(
    "name, kind, channels, parts",
    [
        ("sd1_a", "sd1", 4, {"unet", "text_encoder", "vae"}),
        ("sd1_inpaint", "sd1", 9, {"unet", "text_encoder", "vae"}),
        ("sd1_pix2pix", "sd1", 8, {"unet", "text_encoder", "vae"}),
        ("sd1_ema_a", "sd1", 4, {"unet", "text_encoder", "vae", "ema"}),
        ("sd1_novae", "sd1", 4, {"unet", "text_encoder"}),
        ("sd2_a", "sd2", 4, {"unet", "text_encoder", "vae"}),
        ("sdxl_a", "sdxl", 4, {"unet", "text_encoder", "text_encoder_2", "vae"}),
    ],
)
def test_single_files_are_recognised(ckpts, name, kind, channels, parts):
    info = _info(ckpts[name])
    assert (info.kind, info.layout, info.in_channels, set(info.parts)) == (kind, "ldm", channels, parts)
    assert info.variant == {9: "inpainting", 8: "instruct-pix2pix"}.get(channels, "")


def test_diffusers_agrees_on_the_kinds_it_can_tell_at_this_size(ckpts):
    """diffusers' own detector keys on SDXL's OpenCLIP-G and on 9-channel UNets (SD 2 it tells by a 1024 width)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    def infer(name: str) -> str:
        source = open_model(ckpts[name])
        try:
            meta = {k: torch.empty(v.shape, device="meta") for k, v in source.tensors.items()}
            return infer_diffusers_model_type(meta)
        finally:
            source.close()

    assert infer("sdxl_a") == "xl_base" and infer("sd1_inpaint") == "inpainting" and infer("sd1_a") == "v1"


def test_unet_only_and_refiner_files(tmp_path):
    from safetensors.torch import save_file

    unet = F.unet_shapes("sdxl")
    save_file({k: torch.zeros(v) for k, v in unet.items()}, str(tmp_path / "u.safetensors"))
    assert _info(tmp_path / "u.safetensors").kind == "sdxl"
    refiner = {"conditioner.embedders.0.model.ln_final.weight": (4,), **F.unet_shapes("sd1")}
    assert sd.detect(refiner).kind == "sdxl_refiner"
    assert sd.detect({"encoder.conv_in.weight": (8, 3, 3, 3)}) is None  # a VAE file is not a model


@pytest.mark.parametrize("kind", F.KINDS)
def test_pipelines_are_recognised(pipes, kind):
    info = _info(pipes[kind])
    expected = {"unet", "text_encoder", "vae"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    assert (info.kind, info.layout, info.in_channels, set(info.parts)) == (kind, "diffusers", 4, expected)


def test_library_names_the_variant(ckpts):
    info = describe_model(ckpts["sd1_inpaint"])
    assert info.architecture == "Stable Diffusion 1.x (inpainting)" and info.model_type == "sd1"
    assert describe_model(ckpts["sdxl_a"]).architecture == "Stable Diffusion XL"
    assert "9-channel UNet" in _info(ckpts["sd1_inpaint"]).describe()


# ----------------------------------------------------------------------------- refusals


def _recipe(method: str, *refs, **extra) -> object:
    return recipe_from_dict({"merge_method": method, "models": [{"model": str(r)} for r in refs], **extra})


@pytest.fixture
def no_reads(monkeypatch):
    """Any tensor read fails the test: refusals must come from headers alone."""
    from core.io import tensors

    def boom(self, name, device="cpu"):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(tensors.SafetensorsReader, "get", boom)


def _refused(recipe, tmp_path, error=ModelError) -> str:
    with pytest.raises(error) as info:
        merge.check(recipe)
    with pytest.raises(error) as again:
        merge.run(recipe, tmp_path / "out.safetensors", device="cpu")
    assert str(again.value) == str(info.value)
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob(".out*"))
    return str(info.value)


def test_sd1_with_sdxl_is_refused(ckpts, tmp_path, no_reads):
    text = _refused(_recipe("weighted_sum", ckpts["sd1_a"], ckpts["sdxl_a"]), tmp_path)
    assert text == f"'{ckpts['sdxl_a']}' is SDXL, '{ckpts['sd1_a']}' is SD 1.x: they cannot be merged."


def test_sd_with_another_model_or_layout_is_refused(ckpts, pipes, single_file_ckpt, tmp_path, no_reads):
    text = _refused(_recipe("weighted_sum", ckpts["sd1_a"], single_file_ckpt), tmp_path)
    assert "is not a Stable Diffusion checkpoint" in text and str(single_file_ckpt) in text
    with pytest.raises(ModelError) as info:
        merge.check(_recipe("weighted_sum", ckpts["sd1_a"], pipes["sd1"]))
    assert "a diffusers pipeline" in str(info.value) and "convert one of them" in str(info.value)


@pytest.mark.parametrize(
    "method, names, words",
    [
        ("weighted_sum", ["sd1_a", "sd1_inpaint"],
         ["9-channel (inpainting) UNet", "4-channel one", "only with the inpainting model first (as A)"]),
        ("add_difference", ["sd1_a", "sd1_inpaint", "sd1_c"], ["only with the inpainting model first (as A)"]),
        ("linear", ["sd1_inpaint", "sd1_a"], ["only weighted_sum and add_difference", "not linear"]),
        ("add_difference", ["sd1_inpaint", "sd1_b", "sd1_pix2pix"], ["8-channel UNet", "every other model"]),
        ("weighted_sum", ["sd1_pix2pix", "sd1_inpaint"], ["9-channel UNet", "every other model"]),
    ],
)
def test_wrong_inpainting_directions_are_refused(ckpts, tmp_path, no_reads, method, names, words):
    params = {"parameters": {"weight": 1.0}} if method == "linear" else {}
    text = _refused(_recipe(method, *(ckpts[n] for n in names), **params), tmp_path)
    for word in words:
        assert word in text, text


def test_parts_in_some_models_only_are_refused_with_the_way_out(ckpts, tmp_path, no_reads):
    text = _refused(_recipe("weighted_sum", ckpts["sd1_ema_a"], ckpts["sd1_a"]), tmp_path)
    assert "has EMA weights (model_ema.*)" in text and "'ema: drop'" in text
    text = _refused(_recipe("weighted_sum", ckpts["sd1_a"], ckpts["sd1_novae"]), tmp_path)
    assert "has a VAE" in text and str(ckpts["sd1_novae"]) in text and "'vae:'" in text
    text = _refused(_recipe("weighted_sum", ckpts["sd1_ema_a"], ckpts["sd1_b"], ema="use"), tmp_path)
    assert "has no EMA weights" in text and str(ckpts["sd1_b"]) in text


def test_sd_only_options_and_slices(ckpts, llama_family, tmp_path):
    with pytest.raises(RecipeError, match="applies to Stable Diffusion checkpoints only"):
        merge.check(_recipe("convert", llama_family["a"], vae=str(ckpts["vae"])))
    with pytest.raises(RecipeError, match="apply to Stable Diffusion checkpoints only; model '.*' is not one"):
        merge.check(_recipe("weighted_sum", llama_family["a"], llama_family["b"],
                            parameters={"alpha": {"blocks": {"IN00": 0.3}}}))
    data = {"merge_method": "weighted_sum", "slices": [{"sources": [
        {"model": str(ckpts["sd1_a"]), "layer_range": [0, 1]}, {"model": str(ckpts["sd1_b"]), "layer_range": [0, 1]}]}]}
    with pytest.raises(RecipeError, match="merged whole: use 'models:'"):
        merge.check(recipe_from_dict(data))


def test_bad_block_settings_fail_at_check(ckpts, no_reads):
    a, b = ckpts["sd1_a"], ckpts["sd1_b"]
    with pytest.raises(RecipeError, match=r"parameters\.alpha\.blocks: 'IN12' is not a block of SD 1.x"):
        merge.check(_recipe("weighted_sum", a, b, parameters={"alpha": {"blocks": {"IN12": 0.3}}}))
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight\.blocks: 3 values given"):
        merge.check(recipe_from_dict({"merge_method": "linear", "models": [
            {"model": str(a), "parameters": {"weight": {"blocks": "1,2,3"}}},
            {"model": str(b), "parameters": {"weight": 1}}]}))
    with pytest.raises(RecipeError, match="block weights need a numeric parameter; 'normalize' is bool"):
        merge.check(_recipe("linear", a, b, parameters={"weight": 1, "normalize": {"blocks": {"IN00": 1}}}))
    with pytest.raises(RecipeError, match=r"parameters\.density\.blocks\.IN01: parameter 'density' = 0 is outside"):
        merge.check(recipe_from_dict({"merge_method": "ties", "base_model": str(ckpts["sd1_c"]),
                                      "models": [{"model": str(a)}, {"model": str(b)}, {"model": str(ckpts["sd1_c"])}],
                                      "parameters": {"weight": 1, "density": {"blocks": {"IN01": 0}, "default": 0.5}}}))


def test_options_with_nothing_to_act_on_are_errors(ckpts):
    with pytest.raises(RecipeError, match="ema: 'drop' has nothing to drop"):
        merge.check(_recipe("convert", ckpts["sd1_a"], ema="drop"))
    with pytest.raises(RecipeError, match="drop: pattern 'lora_' matches no tensor"):
        merge.check(_recipe("convert", ckpts["sd1_a"], drop="lora_"))
