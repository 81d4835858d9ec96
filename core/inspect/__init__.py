"""Inspection: look inside models without changing them.

* :mod:`core.inspect.attention` -- self-attention of text encoders and decoders (BERT,
  Llama, GPT-2, ...) and of vision transformers (ViT, DeiT; with or without token
  merging), and attention rollout (Abnar & Zuidema 2020).
* the sibling modules of this package cover diffusion cross-attention, weight
  differences and tokenizers.

Importing this package is cheap: it imports nothing; torch, transformers and numpy
load only when an inspection runs.
"""
