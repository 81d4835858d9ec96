"""kohya / A1111 LoRAs on Stable Diffusion checkpoints with real key names (tiny shapes).

The builders here (``sd1_checkpoint``, ``sdxl_checkpoint``, ``kohya_lora``) are
imported by the other LoRA tests. The naming table is the published layout of
the SD UNet (ldm single-file names against diffusers names), written out by
hand, not derived from the code under test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.errors import MergeStudioError, ModelError
from core.lora import extract_lora, merge_lora, open_lora
from core.lora.names import ModelIndex, diffusers_to_ldm, ldm_to_diffusers

C0, C1, TEMB, H, H2, VOCAB = 8, 16, 32, 8, 12, 16
U = "model.diffusion_model."


# ----------------------------------------------------------------------------- builders


def _resnet(s: dict, p: str, cin: int, cout: int) -> None:
    s.update({
        f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
        f"{p}.emb_layers.1.weight": (cout, TEMB), f"{p}.out_layers.0.weight": (cout,),
        f"{p}.out_layers.3.weight": (cout, cout, 3, 3),
    })
    if cin != cout:
        s[f"{p}.skip_connection.weight"] = (cout, cin, 1, 1)


def _attention(s: dict, p: str, c: int, linear: bool) -> None:
    proj = (c, c) if linear else (c, c, 1, 1)
    tb = f"{p}.transformer_blocks.0"
    s.update({f"{p}.norm.weight": (c,), f"{p}.proj_in.weight": proj, f"{p}.proj_out.weight": proj})
    for attn, ctx in (("attn1", c), ("attn2", H)):
        s.update({f"{tb}.{attn}.to_q.weight": (c, c), f"{tb}.{attn}.to_k.weight": (c, ctx),
                  f"{tb}.{attn}.to_v.weight": (c, ctx), f"{tb}.{attn}.to_out.0.weight": (c, c),
                  f"{tb}.{attn}.to_out.0.bias": (c,)})
    s.update({f"{tb}.ff.net.0.proj.weight": (8 * c, c), f"{tb}.ff.net.2.weight": (c, 4 * c), f"{tb}.norm1.weight": (c,)})


def _hf_clip(s: dict, p: str, h: int) -> None:
    s.update({f"{p}embeddings.token_embedding.weight": (VOCAB, h), f"{p}embeddings.position_embedding.weight": (6, h),
              f"{p}final_layer_norm.weight": (h,)})
    layer = f"{p}encoder.layers.0"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        s.update({f"{layer}.self_attn.{proj}.weight": (h, h), f"{layer}.self_attn.{proj}.bias": (h,)})
    s.update({f"{layer}.layer_norm1.weight": (h,), f"{layer}.mlp.fc1.weight": (2 * h, h),
              f"{layer}.mlp.fc2.weight": (h, 2 * h)})


def sd1_shapes() -> dict[str, tuple[int, ...]]:
    """A subset of SD 1.x's ldm keys: UNet (1x1-conv proj_in), CLIP text encoder, VAE."""
    s: dict[str, tuple[int, ...]] = {f"{U}input_blocks.0.0.weight": (C0, 4, 3, 3), f"{U}time_embed.0.weight": (TEMB, C0),
                                     f"{U}time_embed.2.weight": (TEMB, TEMB)}
    _resnet(s, f"{U}input_blocks.1.0", C0, C0)
    _attention(s, f"{U}input_blocks.1.1", C0, linear=False)
    s[f"{U}input_blocks.3.0.op.weight"] = (C0, C0, 3, 3)
    _resnet(s, f"{U}input_blocks.4.0", C0, C1)
    _attention(s, f"{U}input_blocks.4.1", C1, linear=False)
    _resnet(s, f"{U}middle_block.0", C1, C1)
    _attention(s, f"{U}middle_block.1", C1, linear=False)
    _resnet(s, f"{U}middle_block.2", C1, C1)
    s[f"{U}output_blocks.2.1.conv.weight"] = (C1, C1, 3, 3)
    _resnet(s, f"{U}output_blocks.3.0", 2 * C1, C1)
    _attention(s, f"{U}output_blocks.3.1", C1, linear=False)
    s[f"{U}output_blocks.5.2.conv.weight"] = (C1, C1, 3, 3)
    s.update({f"{U}out.0.weight": (C0,), f"{U}out.2.weight": (4, C0, 3, 3)})
    _hf_clip(s, "cond_stage_model.transformer.text_model.", H)
    s.update({"first_stage_model.encoder.conv_in.weight": (C0, 3, 3, 3),
              "first_stage_model.decoder.mid.attn_1.q.weight": (C0, C0, 1, 1)})
    return s


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """A subset of SDXL's ldm keys: linear proj_in, label_emb, CLIP-L and OpenCLIP-G (fused q/k/v)."""
    s: dict[str, tuple[int, ...]] = {f"{U}input_blocks.0.0.weight": (C0, 4, 3, 3),
                                     f"{U}label_emb.0.0.weight": (TEMB, 2 * C0)}
    _attention(s, f"{U}input_blocks.4.1", C1, linear=True)
    s[f"{U}input_blocks.6.0.op.weight"] = (C1, C1, 3, 3)
    _attention(s, f"{U}output_blocks.0.1", C1, linear=True)
    s[f"{U}output_blocks.2.2.conv.weight"] = (C1, C1, 3, 3)
    s.update({f"{U}out.0.weight": (C0,), "first_stage_model.encoder.conv_in.weight": (C0, 3, 3, 3)})
    _hf_clip(s, "conditioner.embedders.0.transformer.text_model.", H)
    g = "conditioner.embedders.1.model."
    r = f"{g}transformer.resblocks.0."
    s.update({f"{g}token_embedding.weight": (VOCAB, H2), f"{g}positional_embedding": (6, H2),
              f"{g}text_projection": (H2, H2), f"{g}ln_final.weight": (H2,),
              f"{r}attn.in_proj_weight": (3 * H2, H2), f"{r}attn.in_proj_bias": (3 * H2,),
              f"{r}attn.out_proj.weight": (H2, H2), f"{r}ln_1.weight": (H2,),
              f"{r}mlp.c_fc.weight": (4 * H2, H2), f"{r}mlp.c_proj.weight": (H2, 4 * H2)})
    return s


def random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {name: (torch.randn(shape, generator=gen) * 0.1).to(dtype) for name, shape in shapes.items()}
    return state


def save(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def sd1_checkpoint(path: Path, seed: int = 0, dtype=torch.float16) -> Path:
    state = random_state(sd1_shapes(), seed, dtype)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(6).reshape(1, 6)
    return save(state, path, {"modelspec.title": "tiny sd1"})


def sdxl_checkpoint(path: Path, seed: int = 0, dtype=torch.float16) -> Path:
    return save(random_state(sdxl_shapes(), seed, dtype), path)


def kohya_lora(path: Path, modules: dict[str, tuple[int, int, tuple[int, ...]]], seed: int = 0,
               alpha: float | None = None, conv_up: bool = True) -> Path:
    """modules: key stem -> (rank, out, down's trailing shape (in[, kh, kw]))."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for stem, (rank, out, tail) in modules.items():
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, *tail, generator=gen) * 0.3
        up_shape = (out, rank, 1, 1) if len(tail) == 3 and conv_up else (out, rank)
        state[f"{stem}.lora_up.weight"] = torch.randn(*up_shape, generator=gen) * 0.3
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return save(state, path, {"ss_network_module": "networks.lora"})


def delta(lora: dict[str, torch.Tensor], stem: str, shape) -> torch.Tensor:
    """scale * up @ down in float32, shaped like the weight (the formula, written out)."""
    down, up = lora[f"{stem}.lora_down.weight"].float(), lora[f"{stem}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else rank
    return ((up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * (alpha / rank)).reshape(shape)


# SD 1.x UNet modules: ldm path -> diffusers path (the published layout).
SD1_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.2.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0.in_layers.2": "down_blocks.1.resnets.0.conv1",
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.5.0.emb_layers.1": "down_blocks.1.resnets.1.time_emb_proj",
    "input_blocks.7.1.proj_out": "down_blocks.2.attentions.0.proj_out",
    "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
    "input_blocks.10.0.out_layers.3": "down_blocks.3.resnets.0.conv2",
    "input_blocks.11.0.in_layers.0": "down_blocks.3.resnets.1.norm1",
    "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
    "output_blocks.0.0.in_layers.2": "up_blocks.0.resnets.0.conv1",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.1.transformer_blocks.0.attn2.to_k": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.6.0.skip_connection": "up_blocks.2.resnets.0.conv_shortcut",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# SDXL: 3 down blocks (the first without attention), up_blocks.0 and 1 with attentions.
SDXL_NAMES = {
    "label_emb.0.0": "add_embedding.linear_1",
    "input_blocks.4.1.transformer_blocks.1.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.8.1.proj_in": "down_blocks.2.attentions.1.proj_in",
    "output_blocks.0.1.transformer_blocks.9.attn2.to_v": "up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_v",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.0.in_layers.2": "up_blocks.2.resnets.2.conv1",
}


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("table, up_attention", [(SD1_NAMES, {1, 2, 3}), (SDXL_NAMES, {0, 1})])
def test_ldm_and_diffusers_unet_names_follow_the_published_layout(table, up_attention):
    for ldm, diffusers in table.items():
        assert ldm_to_diffusers(ldm) == diffusers, ldm
        assert diffusers_to_ldm(diffusers, 2, up_attention) == ldm, diffusers


def test_names_outside_the_unet_layout_have_no_counterpart():
    assert ldm_to_diffusers("input_blocks.1.2.proj_in") is None
    assert ldm_to_diffusers("input_blocks.3.1.proj_in") is None  # a downsampler slot has no attention
    assert diffusers_to_ldm("down_blocks.0.resnets.0.weird") is None
    assert diffusers_to_ldm("model.layers.0.self_attn.q_proj") is None


def test_index_resolves_openclip_fused_qkv_to_row_slices(tmp_path):
    ckpt = sdxl_checkpoint(tmp_path / "xl.safetensors")
    from core.io.formats import open_model

    index = ModelIndex(open_model(ckpt).tensors)
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    for i, part in enumerate("qkv"):
        found = index.resolve_kohya("te2", f"text_model_encoder_layers_0_self_attn_{part}_proj")
        assert [(t.tensor, t.rows) for t in found] == [(fused, (i * H2, (i + 1) * H2))]
    fc2 = index.resolve_kohya("te2", "text_model_encoder_layers_0_mlp_fc2")
    assert [t.tensor for t in fc2] == ["conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight"]
    te1 = index.resolve_kohya("te1", "text_model_encoder_layers_0_self_attn_q_proj")
    clip_l = "conditioner.embedders.0.transformer.text_model.encoder.layers.0"
    assert [t.tensor for t in te1] == [f"{clip_l}.self_attn.q_proj.weight"]


# ----------------------------------------------------------------------------- kohya merge


SD1_LORA = {
    # diffusers naming (what kohya's sd-scripts write)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, C0, (C0,)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (2, C0, (C0,)),  # linear LoRA onto a 1x1 conv
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (3, C1, (H,)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (4, 8 * C1, (C1,)),
    "lora_unet_up_blocks_0_upsamplers_0_conv": (2, C1, (C1, 3, 3)),  # LoCon 3x3
    "lora_unet_down_blocks_0_resnets_0_conv1": (2, C0, (C0, 3, 3)),
    # ldm naming
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_q": (2, C1, (C1,)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (2, H, (H,)),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (3, 2 * H, (H,)),
}
TE = "cond_stage_model.transformer.text_model.encoder.layers.0"
SD1_TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        f"{U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": f"{U}input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        f"{U}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        f"{U}middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": f"{U}output_blocks.2.1.conv.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1": f"{U}input_blocks.1.0.in_layers.2.weight",
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_q":
        f"{U}output_blocks.3.1.transformer_blocks.0.attn2.to_q.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": f"{TE}.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": f"{TE}.mlp.fc1.weight",
}


def test_kohya_merge_into_sd1_single_file_equals_the_formula(tmp_path):
    ckpt = sd1_checkpoint(tmp_path / "sd1.safetensors")
    lora_path = kohya_lora(tmp_path / "style.safetensors", SD1_LORA, alpha=1.0)
    out = tmp_path / "merged.safetensors"
    result = merge_lora(ckpt, [(lora_path, 0.8)], out)
    assert result.output == out.absolute() and out.is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    base, merged, lora = load_file(ckpt), load_file(out), load_file(lora_path)
    assert set(merged) == set(base)
    touched = set(SD1_TARGETS.values())
    for stem, name in SD1_TARGETS.items():
        expected = (base[name].float() + 0.8 * delta(lora, stem, base[name].shape)).to(torch.float16)
        assert merged[name].dtype == torch.float16
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-3)
        assert not torch.equal(merged[name], base[name])
    for name in set(base) - touched:
        assert merged[name].dtype == base[name].dtype
        assert merged[name].numpy().tobytes() == base[name].numpy().tobytes(), name
    assert result.changed == len(touched) and result.modules == len(SD1_LORA)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny sd1" and "mergestudio_lora" in meta


def test_kohya_te2_lora_updates_the_rows_of_openclip_in_proj(tmp_path):
    ckpt = sdxl_checkpoint(tmp_path / "xl.safetensors")
    modules = {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj": (2, H2, (H2,)) for p in "qkv"}
    modules["lora_te2_text_model_encoder_layers_0_mlp_fc1"] = (2, 4 * H2, (H2,))
    modules["lora_te1_text_model_encoder_layers_0_self_attn_v_proj"] = (2, H, (H,))
    modules["lora_unet_up_blocks_0_upsamplers_0_conv"] = (2, C1, (C1, 3, 3))  # SDXL: output_blocks.2.2.conv
    modules["lora_unet_down_blocks_1_attentions_0_proj_in"] = (2, C1, (C1,))
    lora_path = kohya_lora(tmp_path / "xl_lora.safetensors", modules)  # no alpha: scale 1
    out = tmp_path / "out.safetensors"
    merge_lora(ckpt, [lora_path], out)
    base, merged, lora = load_file(ckpt), load_file(out), load_file(lora_path)
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    expected = base[fused].float().clone()
    for i, p in enumerate("qkv"):
        stem = f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj"
        expected[i * H2:(i + 1) * H2] += delta(lora, stem, (H2, H2))
    torch.testing.assert_close(merged[fused].float(), expected, rtol=0, atol=2e-3)
    upsampler = f"{U}output_blocks.2.2.conv.weight"
    want = base[upsampler].float() + delta(lora, "lora_unet_up_blocks_0_upsamplers_0_conv", (C1, C1, 3, 3))
    torch.testing.assert_close(merged[upsampler].float(), want, rtol=0, atol=2e-3)
    bias = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"
    assert torch.equal(merged[bias], base[bias])


def test_kohya_lora_for_another_model_is_refused_naming_the_key(tmp_path):
    ckpt = sd1_checkpoint(tmp_path / "sd1.safetensors")
    te2_q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    wrong = kohya_lora(tmp_path / "xl.safetensors", {te2_q: (2, H2, (H2,))})
    out = tmp_path / "out.safetensors"
    with pytest.raises(ModelError, match=f"key '{te2_q}.lora_down.weight' matches no module"):
        merge_lora(ckpt, [wrong], out)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad_shape = kohya_lora(tmp_path / "big.safetensors", {to_q: (2, 2 * C0, (C0,))})
    with pytest.raises(ModelError, match=rf"'{to_q}' makes an update of shape \[16, 8\] but tensor .*to_q.weight' .* \[8, 8\]"):
        merge_lora(ckpt, [bad_shape], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "sd1.safetensors", "xl.safetensors"]


def test_kohya_merge_into_a_diffusers_pipeline_keeps_its_layout(diffusers_pipelines, tmp_path):
    pipe = diffusers_pipelines["a"]
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (2, 32, (32,)),
        "lora_unet_input_blocks_1_1_proj_in": (2, 32, (32,)),  # ldm naming onto diffusers weights
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj": (2, 32, (32,)),
    }
    lora_path = kohya_lora(tmp_path / "l.safetensors", modules, alpha=4.0)
    out = tmp_path / "pipe-out"
    merge_lora(pipe, [lora_path], out)
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    unet_in = load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    unet_out = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    lora = load_file(lora_path)
    name = "down_blocks.0.attentions.0.proj_in.weight"
    torch.testing.assert_close(unet_out[name], unet_in[name] + delta(lora, "lora_unet_input_blocks_1_1_proj_in", (32, 32)))
    te_in = load_file(pipe / "text_encoder" / "model.safetensors")
    te_out = load_file(out / "text_encoder" / "model.safetensors")
    k = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    k_delta = delta(lora, "lora_te_text_model_encoder_layers_1_self_attn_k_proj", (32, 32))
    torch.testing.assert_close(te_out[k], te_in[k] + k_delta)
    vae_in = load_file(pipe / "vae" / "diffusion_pytorch_model.safetensors")
    vae_out = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae_in.keys() == vae_out.keys() and all(torch.equal(vae_in[k], vae_out[k]) for k in vae_in)


# ----------------------------------------------------------------------------- kohya extract


def _tuned(base: dict[str, torch.Tensor], names: list[str], seed: int = 1, rank: int = 2) -> dict[str, torch.Tensor]:
    """base + a rank-``rank`` change on ``names`` and a small change on a norm and the VAE."""
    gen = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for name in names:
        w = base[name].float()
        flat = w.reshape(w.shape[0], -1)
        change = torch.randn(flat.shape[0], rank, generator=gen) @ torch.randn(rank, flat.shape[1], generator=gen) * 0.05
        tuned[name] = (flat + change).reshape(w.shape).to(w.dtype)
    for name in (f"{U}out.0.weight", "first_stage_model.encoder.conv_in.weight"):
        tuned[name] = (base[name].float() + 0.01).to(base[name].dtype)
    return tuned


def test_kohya_extract_from_sdxl_round_trips_through_merge(tmp_path):
    shapes = sdxl_shapes()
    base = random_state(shapes, 0, torch.float32)
    changed = [
        f"{U}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        f"{U}output_blocks.2.2.conv.weight",
        f"{U}input_blocks.4.1.proj_in.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
    ]
    base_path = save(base, tmp_path / "base.safetensors")
    tuned_path = save(_tuned(base, changed, rank=2), tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    result = extract_lora(base_path, tuned_path, out, rank=2, device="cpu")
    assert result.format == "kohya"
    lora = open_lora(out)
    names = set(lora.modules)
    # sd-scripts' SDXL names: the UNet in the original (ldm) layout, written out by hand
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_2_2_conv" in names
    assert "lora_unet_input_blocks_4_1_proj_in" in names
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for n in names)
    assert {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv"} <= names
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
    assert lora.modules["lora_unet_output_blocks_2_2_conv"].in_shape == (C1, 3, 3)
    assert set(result.skipped) == {f"{U}out.0.weight", "first_stage_model.encoder.conv_in.weight"}
    assert "largest change 0.01" in result.skipped[f"{U}out.0.weight"]
    lora.close()
    merged_path = tmp_path / "merged.safetensors"
    merge_lora(base_path, [out], merged_path)
    merged, tuned = load_file(merged_path), load_file(tuned_path)
    for name in changed:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-4)
    assert all(r.relative_error < 1e-4 for r in result.modules)


def test_kohya_extract_rank_larger_than_a_module_is_refused_before_reading(tmp_path, monkeypatch):
    base = random_state(sd1_shapes(), 0)
    base_path = save(base, tmp_path / "base.safetensors")
    tuned_path = save(_tuned(base, [f"{U}input_blocks.1.1.proj_in.weight"]), tmp_path / "tuned.safetensors")
    import core.io.tensors as tensors

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the checks passed")

    monkeypatch.setattr(tensors.SafetensorsReader, "get", no_reads)
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    with pytest.raises(MergeStudioError, match=rf"--rank 9 is larger than module '{proj_in}' allows: its weight "
                       r"'.*input_blocks.1.1.proj_in.weight' is \[8, 8, 1, 1\], so at most rank 8"):
        extract_lora(base_path, tuned_path, tmp_path / "x.safetensors", rank=9, modules=r"input_blocks\.1\.1\.proj_in",
                     device="cpu")
    with pytest.raises(MergeStudioError, match="--rank 9 is larger than module"):
        extract_lora(base_path, tuned_path, tmp_path / "x.safetensors", rank=9, device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_kohya_extract_from_diffusers_pipelines_uses_diffusers_names(diffusers_pipelines, tmp_path):
    a, b = diffusers_pipelines["a"], diffusers_pipelines["b"]
    out = tmp_path / "pipe.safetensors"
    result = extract_lora(a, b, out, rank=4, device="cpu")
    lora = open_lora(out)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in lora.modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora.modules
    assert not any(name.startswith("lora_te2_") for name in lora.modules)
    assert any(n.startswith("vae/") for n in result.skipped)
    assert "text_encoder/text_model.embeddings.token_embedding.weight" in result.skipped
    lora.close()
    merged = tmp_path / "merged"
    merge_lora(a, [out], merged)
    unet_a = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    unet_b = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    unet_m = load_file(merged / "unet" / "diffusion_pytorch_model.safetensors")
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_in.weight"):
        change = (unet_b[name] - unet_a[name]).double()
        u, s, vh = torch.linalg.svd(change.reshape(change.shape[0], -1), full_matrices=False)
        best = ((u[:, :4] * s[:4]) @ vh[:4]).reshape(change.shape)
        torch.testing.assert_close((unet_m[name] - unet_a[name]).double(), best, rtol=0, atol=1e-5)
    assert torch.equal(unet_m["conv_in.bias"], unet_a["conv_in.bias"])


# ----------------------------------------------------------------------------- SDXL names as sd-scripts writes them

# sd-scripts trains SDXL on its own original-layout UNet, so its SDXL LoRAs name UNet modules in the
# ldm layout; the text encoders by Hugging Face CLIP names under lora_te1_ / lora_te2_. Written out by
# hand: kohya module name -> (diffusers pipeline tensor, single-file tensor).
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        f"{U}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_input_blocks_8_1_transformer_blocks_3_attn2_to_k": (
        "unet/down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_k.weight",
        f"{U}input_blocks.8.1.transformer_blocks.3.attn2.to_k.weight"),
    "lora_unet_input_blocks_3_0_op": (
        "unet/down_blocks.0.downsamplers.0.conv.weight", f"{U}input_blocks.3.0.op.weight"),
    "lora_unet_middle_block_1_proj_in": (
        "unet/mid_block.attentions.0.proj_in.weight", f"{U}middle_block.1.proj_in.weight"),
    "lora_unet_middle_block_2_in_layers_2": (
        "unet/mid_block.resnets.1.conv1.weight", f"{U}middle_block.2.in_layers.2.weight"),
    "lora_unet_output_blocks_2_2_conv": (
        "unet/up_blocks.0.upsamplers.0.conv.weight", f"{U}output_blocks.2.2.conv.weight"),
    "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2": (
        "unet/up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2.weight",
        f"{U}output_blocks.5.1.transformer_blocks.1.ff.net.2.weight"),
    "lora_unet_output_blocks_8_0_in_layers_2": (
        "unet/up_blocks.2.resnets.2.conv1.weight", f"{U}output_blocks.8.0.in_layers.2.weight"),
    "lora_unet_output_blocks_6_0_skip_connection": (
        "unet/up_blocks.2.resnets.0.conv_shortcut.weight", f"{U}output_blocks.6.0.skip_connection.weight"),
    # transformers 5 saves CLIPTextModel without its text_model. level; sd-scripts' name keeps it
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder/encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (
        "text_encoder_2/text_model.encoder.layers.31.mlp.fc1.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"),
}
# The same modules as diffusers-named kohya files spell them (what our resolver must read too).
SDXL_DIFFUSERS_SPELLING = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_middle_block_1_proj_in": "lora_unet_mid_block_attentions_0_proj_in",
    "lora_unet_output_blocks_2_2_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
    "lora_unet_output_blocks_8_0_in_layers_2": "lora_unet_up_blocks_2_resnets_2_conv1",
}


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory) -> dict[str, Path]:
    """An SDXL pipeline and single file (fixture widths), and a pipeline tuned by rank-2 changes on SDXL_KOHYA."""
    from tests.fixtures import sd_checkpoints as F

    root = tmp_path_factory.mktemp("sdxl-lora")
    pipe = F.make_pipeline(root / "pipe", "sdxl", seed=3)
    tuned = root / "tuned"
    shutil.copytree(pipe, tuned)
    gen = torch.Generator().manual_seed(5)
    files = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
             "text_encoder_2": "model.safetensors"}
    for comp, file in files.items():
        state = load_file(tuned / comp / file)
        for diffusers_name, _ in SDXL_KOHYA.values():
            if diffusers_name.startswith(comp + "/"):
                key = diffusers_name.removeprefix(comp + "/")
                w = state[key]
                flat = w.reshape(w.shape[0], -1)
                change = torch.randn(flat.shape[0], 2, generator=gen) @ torch.randn(2, flat.shape[1], generator=gen)
                state[key] = (flat + 0.05 * change).reshape(w.shape)
        save_file(state, str(tuned / comp / file), metadata={"format": "pt"})
    single = F.make_checkpoint(root / "xl.safetensors", "sdxl", seed=3)
    return {"pipe": pipe, "tuned": tuned, "single": single}


def test_kohya_extract_from_an_sdxl_pipeline_writes_sd_scripts_names(sdxl_models, tmp_path):
    """The diffusers UNet names of a pipeline are written in the original layout, as sd-scripts does for SDXL."""
    out = tmp_path / "xl.safetensors"
    pattern = "|".join(re.escape(d) for d, _ in SDXL_KOHYA.values())
    result = extract_lora(sdxl_models["pipe"], sdxl_models["tuned"], out, rank=2, modules=pattern, device="cpu")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k} == set(SDXL_KOHYA)
    assert {r.module: r.tensor for r in result.modules} == {k: d for k, (d, _) in SDXL_KOHYA.items()}
    merged = tmp_path / "merged"
    merge_lora(sdxl_models["pipe"], [out], merged)  # our resolver reads them back onto the pipeline
    for comp, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                       ("text_encoder_2", "model.safetensors")):
        got, want = load_file(merged / comp / file), load_file(sdxl_models["tuned"] / comp / file)
        for diffusers_name, _ in SDXL_KOHYA.values():
            if diffusers_name.startswith(comp + "/"):
                key = diffusers_name.removeprefix(comp + "/")
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["pipe", "single"])
def test_sdxl_kohya_names_resolve_in_both_spellings(sdxl_models, layout):
    from core.io.formats import open_model

    source = open_model(sdxl_models[layout])
    try:
        index = ModelIndex(source.tensors)
        column = 0 if layout == "pipe" else 1
        prefixes = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2"}
        for module, tensors in SDXL_KOHYA.items():
            head = next(p for p in prefixes if module.startswith(p))
            found = index.resolve_kohya(prefixes[head], module.removeprefix(head))
            assert [t.tensor for t in found] == [tensors[column]], module
        for module, spelled in SDXL_DIFFUSERS_SPELLING.items():
            found = index.resolve_kohya("unet", spelled.removeprefix("lora_unet_"))
            assert [t.tensor for t in found] == [SDXL_KOHYA[module][column]], spelled
    finally:
        source.close()


def test_sd_scripts_sdxl_lora_merges_into_a_single_file_by_its_formula(sdxl_models, tmp_path):
    from core.io.formats import open_model

    src = open_model(sdxl_models["single"])
    try:  # rank 2 on every module: (rank, out, down's trailing shape)
        shapes = {m: (2, src.tensors[n].shape[0], tuple(src.tensors[n].shape[1:])) for m, (_, n) in SDXL_KOHYA.items()}
    finally:
        src.close()
    lora_path = kohya_lora(tmp_path / "sd_scripts_xl.safetensors", shapes, alpha=1.0)
    out = tmp_path / "merged.safetensors"
    merge_lora(sdxl_models["single"], [(lora_path, 0.5)], out)
    base, merged, lora = load_file(sdxl_models["single"]), load_file(out), load_file(lora_path)
    for module, (_, name) in SDXL_KOHYA.items():
        want = (base[name].float() + 0.5 * delta(lora, module, base[name].shape)).to(base[name].dtype)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=2e-3, msg=module)
