"""Where a model's numbered layers are, read from its tensor names and config.

Transformer checkpoints name per-layer tensors ``<prefix><index>.<suffix>``:
``model.layers.3.self_attn.q_proj.weight`` (Llama, Mistral, Qwen),
``transformer.h.3.attn.c_attn.weight`` (GPT-2), ``bert.encoder.layer.3....``
(BERT). Gradients, slices and layer-count checks all work on that index.
Tensors outside the layers are "pre" (embeddings, before the first layer) or
"post" (final norm, lm_head, pooler), which decides which slice's models feed
them, as in mergekit.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional

_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)\.(.+)$")
_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


@dataclass(frozen=True)
class LayerLayout:
    """The layer prefix of a model and its number of layers."""

    prefix: Optional[str]
    count: int
    source: str  # where the count came from, for messages

    def split(self, name: str) -> Optional[tuple[int, str]]:
        """``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj.weight``)."""
        if self.prefix is None or not name.startswith(self.prefix):
            return None
        rest = name[len(self.prefix):]
        index, dot, suffix = rest.partition(".")
        if not dot or not index.isdigit():
            return None
        return int(index), suffix

    def name(self, index: int, suffix: str) -> str:
        assert self.prefix is not None
        return f"{self.prefix}{index}.{suffix}"


def config_layer_count(config: Optional[dict[str, Any]]) -> Optional[tuple[str, int]]:
    """(key, value) of the layer count in a transformers config, if present."""
    if not config:
        return None
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def detect_layout(tensor_names: Iterable[str], config: Optional[dict[str, Any]]) -> LayerLayout:
    """Find the layer prefix (the one with most tensors) and the layer count.

    The count comes from the config when it has one, else from the highest
    index seen; a model with no numbered layers gets count 0.
    """
    prefixes: Counter[str] = Counter()
    indices: dict[str, set[int]] = {}
    for name in tensor_names:
        match = _LAYER_RE.match(name)
        if match:
            prefixes[match.group(1)] += 1
            indices.setdefault(match.group(1), set()).add(int(match.group(2)))
    from_config = config_layer_count(config)
    if not prefixes:
        return LayerLayout(None, 0, "no numbered layers")
    prefix = prefixes.most_common(1)[0][0]
    if from_config is not None:
        key, count = from_config
        return LayerLayout(prefix, count, f"config.json {key}")
    return LayerLayout(prefix, max(indices[prefix]) + 1, "tensor names")


def is_pre_tensor(name: str) -> bool:
    """Embeddings come before the layers; everything else outside them after."""
    lowered = name.lower()
    return any(marker in lowered for marker in _PRE_MARKERS)
