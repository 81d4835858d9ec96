"""Block assignment of every SD key, and block settings in recipes (grammar, errors, evaluation)."""

from __future__ import annotations

import re

import pytest
import torch

from core.errors import RecipeError
from core.merge import blocks as B
from core.merge.recipe import recipe_from_dict
from tests.fixtures import sd_checkpoints as F

# The published layout, written out independently of core/merge/blocks.py: which input/output
# block of the original UNet holds what, for SD 1.x (4 levels) and SDXL (3 levels).
PUBLISHED = {
    "sd1": {"IN00": "conv_in", "IN01": "res+attn", "IN02": "res+attn", "IN03": "down", "IN04": "res+attn",
            "IN05": "res+attn", "IN06": "down", "IN07": "res+attn", "IN08": "res+attn", "IN09": "down",
            "IN10": "res", "IN11": "res", "OUT00": "res", "OUT01": "res", "OUT02": "res+up",
            "OUT03": "res+attn", "OUT04": "res+attn", "OUT05": "res+attn+up", "OUT06": "res+attn",
            "OUT07": "res+attn", "OUT08": "res+attn+up", "OUT09": "res+attn", "OUT10": "res+attn", "OUT11": "res+attn"},
    "sdxl": {"IN00": "conv_in", "IN01": "res", "IN02": "res", "IN03": "down", "IN04": "res+attn", "IN05": "res+attn",
             "IN06": "down", "IN07": "res+attn", "IN08": "res+attn", "OUT00": "res+attn", "OUT01": "res+attn",
             "OUT02": "res+attn+up", "OUT03": "res+attn", "OUT04": "res+attn", "OUT05": "res+attn+up",
             "OUT06": "res", "OUT07": "res", "OUT08": "res"},
}


# The UNet tensors outside input_blocks / middle_block / output_blocks, by the published rule of
# merge-block-weighted and supermerger: the timestep embedding runs before the input blocks (IN00), the
# final norm and convolution after the output blocks (the last OUT block); SDXL's label_emb follows
# time_embed (our rule: supermerger leaves both unmerged). Text encoders: BASE (SDXL: TE1 / TE2).
OUTSIDE_BLOCKS = {
    "sd1": {
        "model.diffusion_model.time_embed.0.weight": "IN00",
        "model.diffusion_model.time_embed.2.bias": "IN00",
        "model.diffusion_model.out.0.weight": "OUT11",
        "model.diffusion_model.out.2.weight": "OUT11",
        "model.diffusion_model.out.2.bias": "OUT11",
        "model.diffusion_model.input_blocks.0.0.weight": "IN00",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": "BASE",
        "betas": "BASE",
        "unet/time_embedding.linear_1.weight": "IN00",
        "unet/time_embedding.linear_2.bias": "IN00",
        "unet/conv_norm_out.weight": "OUT11",
        "unet/conv_out.weight": "OUT11",
        "unet/conv_in.weight": "IN00",
        "text_encoder/text_model.final_layer_norm.weight": "BASE",
    },
    "sdxl": {
        "model.diffusion_model.time_embed.0.weight": "IN00",
        "model.diffusion_model.label_emb.0.0.weight": "IN00",
        "model.diffusion_model.label_emb.0.2.bias": "IN00",
        "model.diffusion_model.out.0.bias": "OUT08",
        "model.diffusion_model.out.2.weight": "OUT08",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": "TE1",
        "conditioner.embedders.1.model.ln_final.weight": "TE2",
        "unet/time_embedding.linear_1.weight": "IN00",
        "unet/add_embedding.linear_1.weight": "IN00",
        "unet/add_embedding.linear_2.bias": "IN00",
        "unet/conv_norm_out.bias": "OUT08",
        "unet/conv_out.weight": "OUT08",
        "text_encoder/text_model.final_layer_norm.weight": "TE1",
        "text_encoder_2/text_model.final_layer_norm.weight": "TE2",
    },
}


def _expected(name: str, kind: str) -> str:
    """The block of an original-layout key, by the published rule (test's own code)."""
    m = re.match(r"model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.", name)
    if m:
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + m.group(2).zfill(2)
    if name.startswith("model.diffusion_model.middle_block."):
        return "M00"
    if name.startswith(("model.diffusion_model.time_embed.", "model.diffusion_model.label_emb.")):
        return "IN00"
    if name.startswith("model.diffusion_model.out."):
        return "OUT08" if kind == "sdxl" else "OUT11"
    if name.startswith("first_stage_model."):
        return "VAE"
    if kind == "sdxl" and name.startswith("conditioner.embedders."):
        return "TE1" if name.startswith("conditioner.embedders.0.") else "TE2"
    return "BASE"


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_tensors_outside_the_numbered_blocks_follow_the_published_tools(kind):
    table = OUTSIDE_BLOCKS["sdxl" if kind == "sdxl" else "sd1"]
    for name, block in table.items():
        if kind == "sd2" and name.startswith(("cond_stage_model.transformer.", "text_encoder/")):
            continue  # SD 2.x's OpenCLIP: below
        if "/" in name:
            assert B.diffusers_block(name, kind) == block, name
            assert B.BlockMap(kind, "diffusers", [name]).block_of(name) == block, name
        else:
            assert B.ldm_block(name, kind) == block, name
            assert B.BlockMap(kind, "ldm", [name]).block_of(name) == block, name
    if kind == "sd2":
        assert B.ldm_block("cond_stage_model.model.ln_final.weight", kind) == "BASE"
    if kind != "sdxl":  # the EMA copy of the final convolution goes with it
        bmap = B.BlockMap(kind, "ldm", F.ldm_shapes(kind, ema=True))
        assert bmap.block_of("model_ema.diffusion_modelout2weight") == "OUT11"
        assert bmap.block_of("model_ema.diffusion_modeltime_embed0weight") == "IN00"


def _content(names: list[str], block: str) -> str:
    """What a block holds, from its key names: 'res+attn+up' etc."""
    parts = []
    if any(".in_layers." in n for n in names):
        parts.append("res")
    if any(".transformer_blocks." in n for n in names):
        parts.append("attn")
    if any(n.endswith(".conv.weight") and "output_blocks" in n for n in names):
        parts.append("up")
    if any(".op.weight" in n for n in names):
        parts.append("down")
    if block == "IN00":
        parts.append("conv_in")
    return "+".join(parts)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_every_original_key_maps_to_its_published_block(kind):
    shapes = F.ldm_shapes(kind, ema=True)
    bmap = B.BlockMap(kind, "ldm", shapes)
    by_block: dict[str, list[str]] = {}
    for name in shapes:
        if name.startswith("model_ema."):
            continue
        block = bmap.block_of(name)
        assert block == _expected(name, kind), name
        by_block.setdefault(block, []).append(name)
    # every block of the architecture holds tensors; SDXL's BASE holds none of its own (the text
    # encoders are TE1 / TE2, which take BASE's value unless named)
    assert set(by_block) == set(B.BLOCK_NAMES[kind]) - ({"BASE"} if kind == "sdxl" else set())
    published = PUBLISHED["sdxl" if kind == "sdxl" else "sd1"]
    for block, content in published.items():
        assert _content(by_block[block], block) == content, block
    assert {bmap.block_of(n) for n in by_block["M00"]} == {"M00"}
    unet = "model.diffusion_model."
    assert {n.removeprefix(unet) for n in by_block["IN00"]} == {
        "input_blocks.0.0.weight", "input_blocks.0.0.bias", "time_embed.0.weight", "time_embed.0.bias",
        "time_embed.2.weight", "time_embed.2.bias",
        *(["label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"]
          if kind == "sdxl" else []),
    }
    last = "OUT08" if kind == "sdxl" else "OUT11"
    assert {n for n in by_block[last] if not n.startswith(f"{unet}output_blocks.")} == {
        f"{unet}out.0.weight", f"{unet}out.0.bias", f"{unet}out.2.weight", f"{unet}out.2.bias"}
    base = by_block.get("BASE", [])
    assert not any(n.startswith(unet) for n in base)  # every UNet tensor is in an IN / M / OUT block
    if kind != "sdxl":
        assert any(n.startswith("cond_stage_model.") for n in base) and "betas" in base


def test_ema_copies_follow_the_weight_they_shadow():
    shapes = F.ldm_shapes("sd1", ema=True)
    bmap = B.BlockMap("sd1", "ldm", shapes)
    for name in shapes:
        if name.startswith("model.diffusion_model."):
            ema = "model_ema." + name.removeprefix("model.").replace(".", "")
            assert bmap.block_of(ema) == bmap.block_of(name), ema
    assert bmap.block_of("model_ema.decay") == "BASE"


def _traced(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every original key as a tensor filled with its index; diffusers' converters say where each goes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shapes = F.ldm_shapes(kind)
    names = list(shapes)
    state = {n: torch.full(s, float(i)) for i, (n, s) in enumerate(shapes.items()) if not n.endswith("position_ids")}
    a = F.ARCH[kind]
    converted = {"unet/" + k: v for k, v in convert_ldm_unet_checkpoint(state, F.unet_config(kind)).items()}
    converted.update({"vae/" + k: v for k, v in convert_ldm_vae_checkpoint(state, F.vae_config()).items()})
    if kind == "sd2":
        te = CLIPTextModel(F.clip_config(a["te_width"], a["te_layers"] - 1, 4 * a["te_width"]))
        converted.update({"text_encoder/" + k: v for k, v in convert_open_clip_checkpoint(te, state).items()})
    else:
        converted.update({"text_encoder/" + k: v for k, v in convert_ldm_clip_checkpoint(state).items()})
    if kind == "sdxl":
        te2 = CLIPTextModelWithProjection(
            F.clip_config(a["te2_width"], a["te2_layers"], 4 * a["te2_width"], projection_dim=a["te2_width"])
        )
        te2_state = convert_open_clip_checkpoint(te2, state, prefix="conditioner.embedders.1.model.")
        converted.update({"text_encoder_2/" + k: v for k, v in te2_state.items()})
    source = {key: names[int(t.reshape(-1)[0])] for key, t in converted.items() if t.numel()}
    return converted, source


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_every_diffusers_key_maps_to_the_block_of_its_original(kind):
    converted, source = _traced(kind)
    unet_keys = {k for k in converted if k.startswith("unet/")}
    assert len(unet_keys) == len([n for n in F.ldm_shapes(kind) if n.startswith("model.diffusion_model.")])
    for key, original in source.items():
        if original.startswith("cond_stage_model.") or original.startswith("conditioner."):
            expected = B.ldm_block(original, kind)
        else:
            expected = _expected(original, kind)
        assert B.diffusers_block(key, kind) == expected, (key, original)
    # the correspondence of the diffusers docs, spelled out for a few keys
    checks = {
        "unet/conv_in.weight": "IN00",
        "unet/down_blocks.0.resnets.1.conv1.weight": "IN02",
        "unet/down_blocks.0.downsamplers.0.conv.weight": "IN03",
        "unet/down_blocks.1.resnets.0.conv1.weight": "IN04",
        "unet/mid_block.resnets.1.conv1.weight": "M00",
        "unet/up_blocks.0.resnets.2.conv1.weight": "OUT02",
        "unet/up_blocks.0.upsamplers.0.conv.weight": "OUT02",
        "unet/up_blocks.1.resnets.0.conv1.weight": "OUT03",
        "unet/conv_out.weight": "OUT08" if kind == "sdxl" else "OUT11",
        "unet/conv_norm_out.weight": "OUT08" if kind == "sdxl" else "OUT11",
        "unet/time_embedding.linear_1.weight": "IN00",
        "vae/decoder.conv_out.weight": "VAE",
    }
    for key, block in checks.items():
        assert B.diffusers_block(key, kind) == block, key
    te_block = "TE1" if kind == "sdxl" else "BASE"
    assert B.diffusers_block("text_encoder/encoder.layers.0.mlp.fc1.weight", kind) == te_block


def test_pipeline_keys_are_the_converted_keys(tmp_path):
    """The tiny pipelines diffusers saves carry exactly the names the correspondence covers."""
    from safetensors import safe_open

    root = F.make_pipeline(tmp_path / "p", "sdxl")
    converted, _ = _traced("sdxl")
    with safe_open(str(root / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {"unet/" + k for k in f.keys()} == {k for k in converted if k.startswith("unet/")}


# ----------------------------------------------------------------------------- settings


def _map(kind: str = "sd1") -> B.BlockMap:
    return B.BlockMap(kind, "ldm", F.ldm_shapes(kind))


def test_string_forms_in_supermerger_and_mbw_order():
    bmap = _map("sd1")
    values = [round(0.01 * i, 2) for i in range(26)]
    mapping, _ = bmap.resolve({"blocks": ",".join(map(str, values))}, "parameters.alpha")
    assert mapping["BASE"] == 0.0 and mapping["IN00"] == 0.01 and mapping["M00"] == 0.13 and mapping["OUT11"] == 0.25
    mapping, default = bmap.resolve({"blocks": ",".join(map(str, values[1:])), "default": 0.7}, "parameters.alpha")
    assert "BASE" not in mapping and mapping["IN00"] == 0.01 and default == 0.7
    no_base = {"blocks": ",".join(map(str, values[1:])), "default": 0.7}
    assert bmap.pick(no_base, "cond_stage_model.transformer.x") == 0.7
    xl = _map("sdxl")
    mapping, _ = xl.resolve({"blocks": ",".join(["0.5"] * 18 + ["0.9"])}, "p")
    assert mapping["IN00"] == 0.5 and mapping["OUT08"] == 0.9 and "BASE" not in mapping


def test_text_encoders_and_vae_take_base_unless_named():
    bmap = _map("sdxl")
    setting = {"blocks": {"BASE": 0.2, "TE2": 0.8}, "default": 0.5}
    assert bmap.pick(setting, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight") == 0.2
    assert bmap.pick(setting, "conditioner.embedders.1.model.ln_final.weight") == 0.8
    assert bmap.pick(setting, "first_stage_model.decoder.conv_out.weight") == 0.2
    assert bmap.pick(setting, "model.diffusion_model.input_blocks.4.1.proj_in.weight") == 0.5
    assert bmap.pick({"blocks": {"IN04": 0.1}}, "model.diffusion_model.out.2.weight") is None
    assert bmap.pick({"blocks": {"OUT08": 0.3, "BASE": 0.1}}, "model.diffusion_model.out.2.weight") == 0.3
    assert bmap.pick({"blocks": {"IN00": 0.7, "BASE": 0.1}}, "model.diffusion_model.label_emb.0.0.weight") == 0.7


@pytest.mark.parametrize(
    "kind, setting, words",
    [
        ("sd1", {"blocks": {"IN12": 0.5}}, ["parameters.alpha.blocks", "'IN12'", "SD 1.x", "IN00–IN11"]),
        ("sdxl", {"blocks": {"IN09": 0.5}}, ["'IN09'", "SDXL", "IN00–IN08", "TE1, TE2"]),
        ("sd1", {"blocks": {"in05": 0.5}}, ["'in05'", "did you mean 'IN05'"]),
        ("sd1", {"blocks": ",".join(["0.5"] * 24)}, ["24 values given", "26", "25 (without BASE)"]),
        ("sdxl", {"blocks": ",".join(["0.5"] * 26)}, ["26 values given", "SDXL takes 20", "19"]),
    ],
)
def test_bad_block_names_and_counts_name_the_field(kind, setting, words):
    with pytest.raises(RecipeError) as info:
        _map(kind).resolve(setting, "parameters.alpha")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "setting, words",
    [
        ({"blocks": "0.1,abc"}, ["value 2", "'abc'"]),
        ({"blocks": {"IN00": "x"}}, ["blocks.IN00", "must be a number"]),
        ({"blocks": {"IN00": 0.1}, "default": "x"}, ["default", "must be a number"]),
        ({"blocks": {"IN00": 0.1}, "extra": 1}, ["'blocks' and 'default' only"]),
        ({"blocks": []}, ["mapping of block names"]),
        ([{"filter": "attn", "value": {"blocks": {"IN00": 0.1}}}], ["whole value", "not inside a filter"]),
    ],
)
def test_block_setting_grammar(setting, words):
    data = {"merge_method": "weighted_sum", "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"alpha": setting}}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    assert "parameters.alpha" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_block_settings_round_trip_through_yaml():
    from core.merge.recipe import load_recipe

    setting = {"blocks": {"BASE": 0.2, "IN00": 0.5, "OUT11": 0.9}, "default": 0.5}
    recipe = recipe_from_dict(
        {"merge_method": "weighted_sum", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"alpha": setting},
         "drop": ["^model_ema\\."], "ema": "drop", "vae": "vae.safetensors"}
    )
    again = load_recipe("r.yaml", text=recipe.to_yaml())
    assert again.parameters == {"alpha": setting}
    assert again.drop == ["^model_ema\\."] and again.ema == "drop" and again.vae == "vae.safetensors"
    plain = recipe_from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    assert set(plain.to_dict()) == {"models", "merge_method"}  # mergekit recipes gain no keys


@pytest.mark.parametrize(
    "data, words",
    [
        ({"drop": "(unclosed"}, ["drop pattern", "not a valid regular expression"]),
        ({"drop": []}, ["'drop' must be a regular expression"]),
        ({"ema": "maybe"}, ["'ema' must be one of keep, drop, use"]),
    ],
)
def test_option_grammar(data, words):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"merge_method": "convert", "models": [{"model": "a"}], **data})
    for word in words:
        assert word in str(info.value)
