"""ToMe for Hugging Face vision transformers: ViT, DeiT and CLIP's vision tower.

ToMe (Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461) was designed on
ViTs: in every block, after the attention branch has been added to the residual
stream and before the MLP branch, the r most similar tokens (cosine similarity of the
attention keys averaged over heads) are merged, weighted by size; proportional
attention adds ``log(size)`` to the logits of the following blocks.

These models are pre-norm::

    x = x + attention(norm1(x))      # [B, N, C]
    x = merge(x)                     # [B, N - r, C]   <- ToMe
    x = x + mlp(norm2(x))

so the patched layer forward (one per family, below) calls the layer's own
sub-modules in the class's order and inserts ``handle._merge`` between the two
residual branches; ``handle._enter`` hands the layer its attention mask (the model's
own until something merged, then the proportional-attention bias ``[B, 1, 1, N]``).

The class token (DeiT: class and distillation tokens) is protected by default and
stays at index 0 (1), which the poolers and classifiers read, so ``pooler_output``
and the logits keep their meaning. ``last_hidden_state`` has ``N - sum(r)`` tokens;
``handle.unmerge`` maps it back to the patch grid.

Refused: masked-image-modelling heads (they fold the sequence back into a grid) and
CLIPForImageClassification (an unweighted mean over patch tokens).

torch and transformers are imported lazily.
"""

from __future__ import annotations

from core.tokens.bipartite import TokenMergeError

SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
)
"""Vision classes :func:`core.tokens.apply` accepts (CLIPModel: its vision tower only)."""

_REFUSED = {
    "ViTForMaskedImageModeling": "it folds the token sequence back into the patch grid",
    "DeiTForMaskedImageModeling": "it folds the token sequence back into the patch grid",
    "CLIPForImageClassification": "it averages the patch tokens without their sizes",
}


def find_target(model):
    """The :class:`~core.tokens.api.EncoderTarget` of a ViT/DeiT/CLIP vision model, None otherwise."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for name, why in _REFUSED.items():
        if name in names:
            raise TokenMergeError(
                f"token merging does not support a {name}: {why}; apply it to the model's vision "
                "encoder instead (e.g. model.vit) and use handle.unmerge()."
            )
    if names & {"ViTModel", "ViTForImageClassification"}:
        return _vit_target(model, "vit")
    if names & {"DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"}:
        return _vit_target(model, "deit")
    if names & {"CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"}:
        return _clip_target(model)
    return None


def _layers_of(encoder_owner) -> list:
    # transformers 5 keeps ViT/DeiT layers on the model itself (.layers); 4.x had .encoder.layer.
    layers = getattr(encoder_owner, "layers", None)
    if layers is None and hasattr(encoder_owner, "encoder"):
        layers = getattr(encoder_owner.encoder, "layer", None) or getattr(encoder_owner.encoder, "layers", None)
    return list(layers) if layers is not None else []


def _vit_target(model, family: str):
    from core.tokens.api import EncoderTarget

    if family == "vit":
        from transformers.models.vit import modeling_vit as mod

        base_class, layer_class, head_attr, specials = mod.ViTModel, mod.ViTLayer, "vit", 1
    else:
        from transformers.models.deit import modeling_deit as mod

        base_class, layer_class, head_attr, specials = mod.DeiTModel, mod.DeiTLayer, "deit", 2
    base = model if isinstance(model, base_class) else getattr(model, head_attr, None)
    if not isinstance(base, base_class):
        return None
    layers = _layers_of(base)
    for index, layer in enumerate(layers):
        attention = getattr(layer, "attention", None)
        parts = all(hasattr(layer, n) for n in ("layernorm_before", "layernorm_after", "mlp", "dropout"))
        if not parts or not hasattr(attention, "k_proj"):
            raise TokenMergeError(
                f"layer {index} of this {type(model).__name__} does not have the {layer_class.__name__} structure "
                "this version of Merge Studio knows (layernorm_before, attention.k_proj, layernorm_after, mlp)."
            )
    config = base.config
    return EncoderTarget(
        model=model,
        family=family,
        encoder=base,
        layers=layers,
        layer_class=layer_class,
        key_modules=[layer.attention.k_proj for layer in layers],
        num_heads=config.num_attention_heads,
        make_forward=_vit_layer_forward,
        special_tokens=specials,  # CLS (+ DeiT's distillation token)
        config=config,
        num_tokens=base.embeddings.patch_embeddings.num_patches + specials,
    )


def _clip_target(model):
    from transformers.models.clip import modeling_clip as mod

    from core.tokens.api import EncoderTarget

    vision = model if isinstance(model, mod.CLIPVisionModel) else getattr(model, "vision_model", None)
    if not isinstance(vision, mod.CLIPVisionModel):
        return None
    layers = list(vision.encoder.layers)
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        parts = all(hasattr(layer, n) for n in ("layer_norm1", "layer_norm2", "mlp"))
        if not parts or not hasattr(attention, "k_proj"):
            raise TokenMergeError(
                f"layer {index} of this {type(model).__name__} does not have the CLIPEncoderLayer structure this "
                "version of Merge Studio knows (layer_norm1, self_attn.k_proj, layer_norm2, mlp)."
            )
    config = vision.config
    return EncoderTarget(
        model=model,
        family="clip",
        encoder=vision.encoder,
        layers=layers,
        layer_class=mod.CLIPEncoderLayer,
        key_modules=[layer.self_attn.k_proj for layer in layers],
        num_heads=config.num_attention_heads,
        make_forward=_clip_layer_forward,
        special_tokens=1,
        config=config,
        num_tokens=vision.embeddings.num_patches + 1,
    )


def _vit_layer_forward(handle, index: int):
    """The patched ``ViTLayer`` / ``DeiTLayer`` forward for layer ``index`` (same calls, merge between branches)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        # hidden_states: [B, N, C]
        attention_mask = handle._enter(index, hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        hidden_states = handle._merge(index, hidden_states)  # [B, N, C] -> [B, N - r, C]

        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return hidden_states + residual

    return forward


def _clip_layer_forward(handle, index: int):
    """The patched ``CLIPEncoderLayer`` forward for layer ``index`` (same calls, merge between branches)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        # hidden_states: [B, N, C]
        attention_mask = handle._enter(index, hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = handle._merge(index, hidden_states)  # [B, N, C] -> [B, N - r, C]

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states

    return forward
