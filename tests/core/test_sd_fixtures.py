"""The synthetic SD checkpoints use the real key names: diffusers' own converters load them strictly."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import sd_checkpoints as F


def _load(model: torch.nn.Module, state: dict) -> None:
    """Strict key matching (transformers 5 dropped the 'text_model.' prefix of CLIP's own names)."""
    keys = set(model.state_dict())
    state = {(k if k in keys else k.removeprefix("text_model.")): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    # transformers keeps position_ids as a non-persistent buffer; old SD 1.x checkpoints store it.
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}


@pytest.mark.parametrize("kind", F.KINDS)
def test_unet_and_vae_names_load_into_diffusers(kind):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = F.state_from_shapes(F.ldm_shapes(kind), 0, torch.float32)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    converted = convert_ldm_unet_checkpoint(state, F.unet_config(kind))
    assert len(converted) == len(unet_keys)  # every ldm UNet key has its diffusers counterpart
    UNet2DConditionModel(**F.unet_config(kind)).load_state_dict(converted, strict=True)
    vae = convert_ldm_vae_checkpoint(state, F.vae_config())
    assert len(vae) == len([k for k in state if k.startswith("first_stage_model.")])
    AutoencoderKL(**F.vae_config()).load_state_dict(vae, strict=True)


@pytest.mark.parametrize("kind", F.KINDS)
def test_text_encoder_names_load_into_transformers(kind):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = F.state_from_shapes(F.ldm_shapes(kind), 0, torch.float32)
    a = F.ARCH[kind]
    if kind == "sd2":
        model = CLIPTextModel(F.clip_config(a["te_width"], a["te_layers"] - 1, 4 * a["te_width"]))
        converted = convert_open_clip_checkpoint(model, state)
        converted.pop("text_projection.weight", None)  # SD 2's diffusers encoder has no projection
        _load(model, converted)
        return
    _load(CLIPTextModel(F.clip_config(a["te_width"], a["te_layers"])), convert_ldm_clip_checkpoint(state))
    if kind == "sdxl":
        model = CLIPTextModelWithProjection(
            F.clip_config(a["te2_width"], a["te2_layers"], 4 * a["te2_width"], projection_dim=a["te2_width"])
        )
        _load(model, convert_open_clip_checkpoint(model, state, prefix="conditioner.embedders.1.model."))


def test_ema_copies_and_variants():
    shapes = F.ldm_shapes("sd1", in_channels=9, ema=True)
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"][1] == 9
    assert shapes["model_ema.diffusion_modelinput_blocks00weight"][1] == 9
    unet = [k for k in shapes if k.startswith("model.diffusion_model.")]
    ema = [k for k in shapes if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    assert len(ema) == len(unet) == 686  # SD 1.5's UNet has 686 tensors
    assert len(F.ldm_shapes("sdxl", text_encoder=False, vae=False)) == 1680  # and SDXL's 1680


def test_pipeline_components_load_with_diffusers(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = F.make_pipeline(tmp_path / "pipe", "sd1", seed=3)
    UNet2DConditionModel.from_pretrained(root / "unet")
    AutoencoderKL.from_pretrained(root / "vae")
    CLIPTextModel.from_pretrained(root / "text_encoder")
