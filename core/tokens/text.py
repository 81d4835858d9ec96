"""ToMe for BERT-style text encoders (BertModel, all-MiniLM-L6-v2, BERT classifiers).

ToMe (Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461) merges tokens inside
each layer, after the attention block and before the MLP. BERT is post-norm: a
``BertLayer`` is ``attention`` (self-attention, output projection, residual,
LayerNorm) followed by ``feed_forward_chunk`` (MLP, residual, LayerNorm), so the merge
sits between the two calls, on the attention block's output ``[B, N, C]``.

Text specifics:

* **Padding.** The layer's attention mask says which tokens are real. Padding tokens
  are *protected* (never merged, never merged into), so a sentence's merges are
  exactly those it makes alone; its real tokens stay a prefix of the row (right
  padding) and its outputs match an unpadded run up to float rounding. After the
  first merge every layer gets one additive mask ``[B, 1, 1, N]``: ``log(size)`` on
  real tokens (proportional attention), the dtype's minimum on padding.
* **Sentence embeddings.** A merged token stands for ``size`` input tokens, so mean
  pooling must weight it by the number of *real* input tokens it covers:
  :func:`mean_pool`. Equivalently -- and that is the definition we test against --
  ``handle.unmerge(hidden)`` gives back ``[B, N_input, C]`` and the usual masked mean
  over the input's attention mask gives the same vector.
* **pooler_output** (CLS) keeps working: the CLS token is protected and stays at
  index 0.

Heads with per-token outputs (masked LM, token classification, question answering)
are refused: their logits would have fewer positions than the input. Apply to
``model.bert`` and map per-token results back with ``handle.unmerge``.

torch and transformers are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.tokens.bipartite import TokenMergeError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

SUPPORTED = (
    "BertModel",
    "BertForSequenceClassification",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
)
"""Text classes :func:`core.tokens.apply` accepts (their outputs read the pooled CLS token)."""

_PER_TOKEN = (
    "BertForMaskedLM",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForPreTraining",
    "BertLMHeadModel",
)


def find_target(model):
    """The :class:`~core.tokens.api.EncoderTarget` of a BERT model, None for other models."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if not names & {*SUPPORTED, *_PER_TOKEN}:
        return None  # not a BERT: do not even import transformers
    from transformers.models.bert import modeling_bert as mb

    from core.tokens.api import EncoderTarget

    per_token = tuple(getattr(mb, name) for name in _PER_TOKEN if hasattr(mb, name))
    if isinstance(model, mb.BertModel):
        bert = model
    elif isinstance(model, per_token):
        raise TokenMergeError(
            f"a {type(model).__name__} predicts one output per input token, which merging would shorten; "
            "apply token merging to its .bert and map per-token outputs back with handle.unmerge()."
        )
    elif isinstance(model, tuple(getattr(mb, name) for name in SUPPORTED[1:])):
        bert = model.bert
    else:
        return None
    config = bert.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise TokenMergeError(
            f"this {type(model).__name__} is configured as a decoder (is_decoder/add_cross_attention); "
            "token merging supports bidirectional encoders only."
        )
    layers = list(bert.encoder.layer)
    for index, layer in enumerate(layers):
        parts = (hasattr(layer, "attention"), hasattr(layer, "feed_forward_chunk"))
        if not all(parts) or not hasattr(layer.attention, "self"):
            raise TokenMergeError(
                f"layer {index} of this {type(model).__name__} does not have the BertLayer structure this "
                "version of Merge Studio knows (attention.self, feed_forward_chunk)."
            )
    return EncoderTarget(
        model=model,
        family="bert",
        encoder=bert.encoder,
        layers=layers,
        layer_class=mb.BertLayer,
        key_modules=[layer.attention.self.key for layer in layers],
        num_heads=config.num_attention_heads,
        make_forward=_bert_layer_forward,
        special_tokens=1,
        config=config,
        max_tokens=getattr(config, "max_position_embeddings", None),
    )


def _bert_layer_forward(handle, index: int):
    """The patched ``BertLayer.forward`` for layer ``index``.

    Same calls as the class's forward (attention, then the chunked feed-forward), with
    ``handle._merge`` between them and the mask exchanged by ``handle._enter``. Cross
    attention is absent: decoders are refused by :func:`find_target`.
    """
    from transformers.pytorch_utils import apply_chunking_to_forward

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        **kwargs,
    ):
        # hidden_states: [B, N, C]; attention_mask: what BertModel built for the input
        # (None, bool or additive [B, 1, N, N]) -- replaced by our [B, 1, 1, N'] after a merge.
        attention_mask = handle._enter(index, hidden_states, attention_mask)
        attention_output, _ = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)
        attention_output = handle._merge(index, attention_output)  # [B, N, C] -> [B, N - r, C]
        return apply_chunking_to_forward(
            self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, attention_output
        )

    return forward


def mean_pool(hidden: Tensor, handle_or_size=None, attention_mask: Tensor | None = None) -> Tensor:
    """Mean pooling of a (possibly merged) sequence: ``hidden [B, N, C] -> [B, C]``.

    The sentence-transformers pooling of all-MiniLM (masked mean over the real tokens),
    made correct for merged sequences: each token is weighted by the number of real
    input tokens it stands for.

    Args:
        hidden: ``last_hidden_state`` of the patched (or unpatched) model.
        handle_or_size: the :class:`~core.tokens.api.TokenMergeHandle` of the forward
            that produced ``hidden`` (its assignment maps inputs to tokens), a size
            tensor ``[B, N, 1]`` / ``[B, N]``, or None for an unmerged sequence.
        attention_mask: with a handle or None: the *input's* mask ``[B, N_input]``
            (what the tokenizer returned); with a size tensor: a mask of the merged
            length ``[B, N]``. None: every token is real.

    With a handle this equals ``masked_mean(handle.unmerge(hidden), attention_mask)``.
    """
    import torch

    from core.tokens.api import TokenMergeHandle

    batch, tokens = hidden.shape[:2]
    dtype = hidden.dtype if hidden.is_floating_point() else torch.float32
    if isinstance(handle_or_size, TokenMergeHandle):
        assignment = handle_or_size.assignment
        if assignment is None:  # nothing merged: the input's mask applies as it is
            weights = attention_mask.to(dtype) if attention_mask is not None else hidden.new_ones(batch, tokens)
        else:
            if attention_mask is None:
                real = torch.ones(assignment.shape, dtype=dtype, device=hidden.device)
            elif attention_mask.shape != assignment.shape:
                raise ValueError(
                    f"mean_pool: attention_mask must be the input's mask {list(assignment.shape)}, "
                    f"got {list(attention_mask.shape)}."
                )
            else:
                real = attention_mask.to(device=hidden.device, dtype=dtype)
            # weights[b, j] = number of real input tokens that token j covers.
            weights = torch.zeros(batch, tokens, dtype=dtype, device=hidden.device).scatter_add_(1, assignment, real)
    elif handle_or_size is not None:
        size = handle_or_size[..., 0] if handle_or_size.dim() == 3 else handle_or_size
        weights = size.to(dtype)
        if attention_mask is not None:
            weights = weights * attention_mask.to(dtype)
    else:
        weights = attention_mask.to(dtype) if attention_mask is not None else hidden.new_ones(batch, tokens)
    if weights.shape != (batch, tokens):
        raise ValueError(f"mean_pool: weights {list(weights.shape)} do not match hidden {list(hidden.shape)}.")
    total = (hidden * weights[..., None]).sum(dim=1)
    return total / weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
