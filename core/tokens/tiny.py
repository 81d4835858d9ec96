"""Random models "of the usual shape" for ``mergestudio tokens bench --tiny vit|bert|unet``.

For people without weights (and for the benchmarks in ``bench/``): the architecture and
sizes of a well-known model, random weights, nothing downloaded.

=======  ====================================================================  ==========
kind     ``size="full"`` (the default)                                          ``"small"``
=======  ====================================================================  ==========
vit      ViT-B/16: 224 px, 16 px patches (197 tokens), hidden 768, 12 layers,  32 px, 8 px
         12 heads, MLP 3072 (``ViTModel`` with its pooler)                     patches,
                                                                               hidden 32,
                                                                               3 layers
bert     BERT-base: vocab 30522, hidden 768, 12 layers, 12 heads, MLP 3072,    hidden 32,
         512 positions (``BertModel``)                                         3 layers
unet     Stable Diffusion 1.5's UNet: ``UNet2DConditionModel`` with channels   channels
         (320, 640, 1280, 1280), 2 layers per block, cross-attention 768,      (32, 64),
         8 heads, 4 latent channels (needs the ``diffusers`` package)          1 layer
=======  ====================================================================  ==========

``"small"`` is for tests (builds in milliseconds). Weights are drawn from a fixed seed,
so a tiny model is the same in every run. torch, transformers and diffusers are imported
lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import ModelError

KINDS = ("vit", "bert", "unet")
SIZES = ("full", "small")


@dataclass
class TinyModel:
    """A random model and what the bench needs to know about it."""

    model: Any
    kind: str  # "vit" | "bert" | "unet"
    description: str
    notes: list[str] = field(default_factory=list)


def _check(kind: str, size: str) -> None:
    if kind not in KINDS:
        raise ModelError(f"--tiny {kind!r} is not a tiny model kind; use one of {', '.join(KINDS)}.")
    if size not in SIZES:
        raise ModelError(f"tiny model size {size!r} is not one of {', '.join(SIZES)}.")


def build(kind: str, size: str = "full", attn: str | None = None, seed: int = 0) -> TinyModel:
    """A random ``kind`` model (``vit``, ``bert`` or ``unet``) of the usual shape, in eval mode.

    ``attn`` is the transformers attention implementation (``"sdpa"`` by default,
    ``"eager"``); it is ignored for the UNet. Raises :class:`~core.errors.ModelError`
    for an unknown kind, or a UNet without the diffusers package.
    """
    _check(kind, size)
    if kind == "unet":
        return _unet(size, seed)
    import torch

    torch.manual_seed(seed)
    impl = attn or "sdpa"
    if kind == "vit":
        from transformers import ViTConfig, ViTModel

        if size == "full":
            config = ViTConfig(
                image_size=224,
                patch_size=16,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                attn_implementation=impl,
            )
            text = "random ViT-B/16 (224 px, 197 tokens, hidden 768, 12 layers)"
        else:
            config = ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                intermediate_size=64,
                attn_implementation=impl,
            )
            text = "small random ViT (32 px, 17 tokens, hidden 32, 3 layers)"
        return TinyModel(ViTModel(config).eval(), "vit", text)

    from transformers import BertConfig, BertModel

    if size == "full":
        config = BertConfig(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            attn_implementation=impl,
        )
        text = "random BERT-base (hidden 768, 12 layers)"
    else:
        config = BertConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
            attn_implementation=impl,
        )
        text = "small random BERT (hidden 32, 3 layers)"
    return TinyModel(BertModel(config).eval(), "bert", text)


def sd15_unet_config(size: str = "full") -> dict:
    """The ``UNet2DConditionModel`` config of a Stable Diffusion 1.5-shaped UNet (or a small one)."""
    if size == "full":
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        }
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def _unet(size: str, seed: int) -> TinyModel:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise ModelError(
            "--tiny unet needs the diffusers package, which is not installed (pip install diffusers)."
        ) from None
    import torch

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**sd15_unet_config(size)).eval()
    if size == "full":
        text = "random SD-1.5-shaped UNet (channels 320/640/1280/1280, cross-attention 768)"
    else:
        text = "small random UNet (channels 32/64, cross-attention 32)"
    return TinyModel(model, "unet", text)
