"""Cross-attention maps per prompt token for Stable Diffusion (1.x / 2.x / XL) pipelines (DAAM).

Re-implemented from the paper, not from its code: Tang, Liu, Pandey, Jiang, Yang,
Kumar, Stenetorp, Lin, Ture, "What the DAAM: Interpreting Stable Diffusion Using
Cross Attention", ACL 2023, https://arxiv.org/abs/2210.04885.

DAAM's heat map for prompt token ``k`` is the cross-attention probability that the
latent pixels give to ``k``, summed over heads, layers and denoising steps after each
layer's map has been upsampled to the image size (the paper's Eqs. 4-5)::

    D[k] = sum_t sum_l sum_h  upsample( softmax(Q_lh K_lh^T / sqrt(d))[:, k] )   [H, W]

How it is captured here
-----------------------
* Every selected ``attn2`` module of the UNet (the cross-attention of each
  ``BasicTransformerBlock``) gets a :class:`_CaptureProcessor` that wraps the processor
  it had. The wrapper first computes ``softmax(QK^T * attn.scale)`` for the
  *conditional* half of the classifier-free-guidance batch (diffusers stacks
  ``[negative, prompt]``) from the layer's own ``to_q`` / ``to_k`` (and ``norm_cross``,
  ``norm_q``, ``norm_k`` when present), then calls the wrapped processor unchanged, so
  the layer's output, and hence the image, is bit-identical to a run without capture.
  The original processors are put back in a ``finally``.
* The map of a layer with ``N`` latent tokens is reshaped to its latent grid: the
  UNet halves the latent ``(h, w) = (H, W) / vae_scale_factor`` with stride-2
  convolutions, ``ceil(h / 2)`` each time, so the grid is the first ``(h', w')`` in
  that sequence with ``h' * w' == N``. Any height and width that are multiples of 8
  (and of the VAE factor) therefore work, square or not.
* Only running sums are kept, one ``[77 * chunks, h', w']`` tensor per latent grid.
  Bilinear upsampling is linear, so upsampling each grid's sum once at the end equals
  upsampling every layer's map at every step and summing (up to float rounding), at a
  fraction of the memory and time.
* Steps are counted with ``callback_on_step_end``; the same callback stops the run at
  the next step when the job is cancelled.

Prompts longer than 75 tokens
-----------------------------
CLIP's text encoder sees 77 positions (start, 75 tokens, end). A longer prompt is cut
into windows of 75 token ids; each window is wrapped with start/end, padded to 77 with
the tokenizer's pad token, encoded separately, and the embeddings are concatenated
along the sequence (the approach A1111's web UI popularised; windows are cut at fixed
positions here, not at commas). The negative prompt is padded with empty windows to
the same count (or the prompt, when the negative is longer). The UNet's cross-attention
then attends over all ``77 * chunks`` positions and the maps' token axis spans every
window; start, end and padding positions are dropped from the output.

SDXL
----
A ``StableDiffusionXLPipeline`` (Podell et al., "SDXL: Improving Latent Diffusion
Models for High-Resolution Image Synthesis", 2023, https://arxiv.org/abs/2307.01952)
conditions its UNet on two text encoders: each position's context vector is the
concatenation, along the features, of ``text_encoder``'s and ``text_encoder_2``'s
penultimate hidden states, and ``text_encoder_2``'s pooled, projected output enters
through the added ``text_time`` embedding. The cross-attention is the same ``attn2``
over 77 positions per window, so the capture is unchanged; what differs is the text:

* The tokens, and so the maps, are listed from the first ``tokenizer``. Released SDXL
  uses the same BPE in both tokenizers (only the pad token differs), so the positions
  agree; when ``tokenizer_2`` splits the prompt differently a note says so.
* Up to 75 tokens the prompt goes to the pipeline as text, which encodes it itself.
* Longer prompts are windowed as above with each tokenizer's own start/end/pad ids;
  each window goes through both encoders (penultimate hidden states, features
  concatenated), the windows are concatenated along the sequence, and the pooled
  embedding is ``text_encoder_2``'s for the first window (the convention of A1111's web
  UI and compel). These are passed as ``prompt_embeds`` / ``pooled_prompt_embeds`` and
  the negative's as ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds``.
* An empty negative prompt is handed over as *no* negative prompt, so a pipeline with
  ``force_zeros_for_empty_prompt`` (SDXL's default) uses zero unconditional embeddings
  (and zeros for long prompts too), as a plain call without ``negative_prompt`` does.

Normalisation: each token's map is divided by its own maximum over the image, so
``maps[k]`` lies in ``[0, 1]``; ``raw_max[k]`` keeps that maximum (the summed
probability at the hottest pixel) so maps stay comparable across tokens and runs.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional

from core.errors import CancelledError, MergeStudioError, ModelError
from core.jobs import CancelToken, Progress, drive

if TYPE_CHECKING:  # heavy imports stay lazy
    import numpy as np
    import torch

WINDOW = 75  # prompt tokens per CLIP window (77 positions minus start and end)
LEVELS = ("down", "mid", "up")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = REQUIRED_COMPONENTS + ("text_encoder_2", "tokenizer_2")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class CrossAttentionError(MergeStudioError):
    """A cross-attention capture cannot run as asked (input, pipeline or option)."""


# ----------------------------------------------------------------------------- result


@dataclass
class CrossAttentionMaps:
    """Per-token cross-attention heat maps of one generated image.

    ``maps`` is float32 ``[T, H, W]`` at the image resolution, ``T == len(tokens)``,
    each map divided by its own maximum (``raw_max[k]``), so it lies in ``[0, 1]``.
    ``image`` is the generated ``[H, W, 3]`` uint8 image.
    """

    pipeline: str
    prompt: str
    negative_prompt: str
    tokens: list[str]
    token_chunks: list[int]
    maps: "np.ndarray"
    raw_max: list[float]
    image: "np.ndarray"
    height: int
    width: int
    steps: int
    seed: int
    guidance_scale: float
    timesteps: list[int]
    layers: list[str]
    heads: str
    chunks: int
    notes: list[str] = field(default_factory=list)

    def overlay(self, token: int, alpha: float = 0.5) -> "np.ndarray":
        """The image with ``token``'s map as a heat colour on top: ``[H, W, 3]`` uint8.

        ``out = (1 - alpha * m) * image + alpha * m * heat(m)`` per pixel, with ``m`` the
        normalised map, so cold pixels keep the image and hot ones take the colour.
        """
        import numpy as np

        if isinstance(token, bool) or not isinstance(token, int) or not -len(self.tokens) <= token < len(self.tokens):
            raise CrossAttentionError(
                f"token={token!r} is not a token index; this prompt has {len(self.tokens)} tokens "
                f"(0..{len(self.tokens) - 1}).")
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise CrossAttentionError(f"alpha={alpha!r} must be a number between 0 and 1.")
        m = np.clip(self.maps[token].astype(np.float32), 0.0, 1.0)[..., None]
        blend = float(alpha) * m
        out = (1.0 - blend) * self.image.astype(np.float32) + blend * heat_colours(m[..., 0])
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def to_json(self, include_maps: bool = False) -> dict:
        """Everything but the arrays as plain JSON types (``maps`` as nested lists when asked)."""
        out: dict[str, Any] = {
            "pipeline": self.pipeline, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "tokens": list(self.tokens), "token_chunks": [int(c) for c in self.token_chunks],
            "raw_max": [float(v) for v in self.raw_max],
            "height": int(self.height), "width": int(self.width), "steps": int(self.steps),
            "seed": int(self.seed), "guidance_scale": float(self.guidance_scale),
            "timesteps": [int(t) for t in self.timesteps], "layers": list(self.layers),
            "heads": self.heads, "chunks": int(self.chunks), "notes": list(self.notes),
        }
        if include_maps:
            out["maps"] = self.maps.astype(float).tolist()
        return out

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write ``maps``, ``image`` and the JSON metadata to one ``.npz``, atomically.

        The file is written next to ``path`` under a temporary name and renamed, so an
        interrupted save never leaves a half-written file where a good one was. No
        pickled objects: it loads with ``np.load(path)`` (``allow_pickle=False``).
        """
        import numpy as np

        path = Path(path)
        if not path.parent.is_dir():
            raise CrossAttentionError(f"Cannot save {path}: the folder {path.parent} does not exist.")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, maps=self.maps.astype(np.float32), image=self.image.astype(np.uint8),
                                    meta=np.array(json.dumps(self.to_json())))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "CrossAttentionMaps":
        """Read a file written by :meth:`save_npz`."""
        import numpy as np

        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                maps, image = data["maps"], data["image"]
        except (OSError, KeyError, ValueError) as exc:
            raise CrossAttentionError(
                f"{path} is not a cross-attention .npz written by Merge Studio ({_first_line(exc)}).") from None
        return cls(maps=maps, image=image, **meta)


def heat_colours(m: "np.ndarray") -> "np.ndarray":
    """A blue -> cyan -> yellow -> red heat colour for values in [0, 1]: ``[H, W] -> [H, W, 3]`` in 0..255.

    The classic piecewise-linear "jet" ramp, written out (no plotting dependency).
    """
    import numpy as np

    x = np.clip(m.astype(np.float32), 0.0, 1.0)
    rgb = np.stack([1.5 - np.abs(4.0 * x - 3.0), 1.5 - np.abs(4.0 * x - 2.0), 1.5 - np.abs(4.0 * x - 1.0)], axis=-1)
    return np.clip(rgb, 0.0, 1.0) * 255.0


# ----------------------------------------------------------------------------- layers


def layer_level(name: str) -> str:
    """The resolution level of a UNet module name: ``"down"``, ``"mid"`` or ``"up"``."""
    head = name.split(".", 1)[0]
    if head == "down_blocks":
        return "down"
    if head == "mid_block":
        return "mid"
    if head == "up_blocks":
        return "up"
    raise CrossAttentionError(f"{name!r} is not inside the UNet's down_blocks, mid_block or up_blocks.")


def _attn2_modules(unet) -> dict[str, Any]:
    """name -> ``attn2`` Attention module, ordered down, mid, up (execution order within a level)."""
    found = [(name, module) for name, module in unet.named_modules()
             if name.endswith(".attn2") and hasattr(module, "set_processor") and hasattr(module, "to_q")]
    order = {level: i for i, level in enumerate(LEVELS)}
    found.sort(key=lambda item: order.get(_level_or_none(item[0]), len(LEVELS)))  # stable: keeps block order
    return dict(found)


def _level_or_none(name: str) -> Optional[str]:
    try:
        return layer_level(name)
    except CrossAttentionError:
        return None


def attention_layers(pipeline) -> list[str]:
    """The UNet's cross-attention (``attn2``) module names, down -> mid -> up.

    The level of each is the first part of its name (``down_blocks`` / ``mid_block`` /
    ``up_blocks``); :func:`layer_level` returns it as ``"down"`` / ``"mid"`` / ``"up"``.
    ``pipeline`` is a pipeline folder, a loaded pipeline or a UNet.
    """
    if isinstance(pipeline, (str, os.PathLike)):
        unet = _load_pipeline(Path(pipeline).expanduser(), "cpu").unet
    else:
        unet = getattr(pipeline, "unet", pipeline)
    return list(_attn2_modules(unet))


def latent_grid(n_tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid of a UNet layer with ``n_tokens`` latent tokens.

    The UNet's stride-2 downsamplers map a side ``s`` to ``ceil(s / 2)``, and its
    upsamplers go back to the same sizes, so every layer's grid is one of
    ``(h, w), (ceil(h/2), ceil(w/2)), ...``; returns the one with ``h * w == n_tokens``.
    """
    h, w = latent_h, latent_w
    while True:
        if h * w == n_tokens:
            return h, w
        if h == 1 and w == 1:
            raise CrossAttentionError(
                f"A cross-attention layer has {n_tokens} latent tokens, which is no downsampling of the "
                f"{latent_h}x{latent_w} latent (is token merging applied to this UNet? remove it first).")
        h, w = (h + 1) // 2, (w + 1) // 2


# ----------------------------------------------------------------------------- capture


class _Recorder:
    """Running sums of cross-attention probabilities, one ``[S, h, w]`` tensor per latent grid.

    ``S`` is the encoder sequence length (``77 * chunks``). ``step`` is the denoising
    step now running; probabilities are added only when it is in ``wanted`` (None: all).
    """

    def __init__(self, latent_h: int, latent_w: int, heads: Optional[list[int]], wanted: Optional[set[int]],
                 cfg: bool):
        self.latent_h, self.latent_w = latent_h, latent_w
        self.heads = heads
        self.wanted = wanted
        self.cfg = cfg
        self.step = 0
        self.sums: dict[tuple[int, int], "torch.Tensor"] = {}
        self.seen_steps: set[int] = set()
        self.seen_layers: list[str] = []

    @property
    def active(self) -> bool:
        return self.wanted is None or self.step in self.wanted

    def probabilities(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> "torch.Tensor":
        """Conditional-half attention probabilities ``softmax(QK^T * scale)``: ``[B_cond, heads, N, S]``."""
        import torch

        if hidden_states.ndim == 4:  # [B, C, h, w] inputs, as the stock processors accept them
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        batch = hidden_states.shape[0]
        first = batch // 2 if self.cfg else 0  # diffusers stacks [negative, prompt] for guidance
        if encoder_hidden_states is None:
            raise CrossAttentionError("A cross-attention layer was called without text embeddings.")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        h = hidden_states[first:]
        e = encoder_hidden_states[first:]
        if attn.norm_cross:
            e = attn.norm_encoder_hidden_states(e)
        q = attn.to_q(h)
        k = attn.to_k(e)
        heads = attn.heads
        q = q.view(q.shape[0], -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(k.shape[0], -1, heads, k.shape[-1] // heads).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        # float32 scores and softmax: half-precision models would lose small probabilities
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, e.shape[1], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])[first:]
            scores = scores + mask.float()
        return scores.softmax(dim=-1)

    def add(self, name: str, probs: "torch.Tensor") -> None:
        """Add one layer call's probabilities ``[B_cond, heads, N, S]`` to its grid's running sum."""
        chosen = probs if self.heads is None else probs[:, self.heads]
        per_token = chosen.sum(dim=(0, 1))  # [N, S]
        gh, gw = latent_grid(per_token.shape[0], self.latent_h, self.latent_w)
        grid = per_token.transpose(0, 1).reshape(per_token.shape[1], gh, gw)  # [S, gh, gw]
        key = (gh, gw)
        if key in self.sums:
            if self.sums[key].shape != grid.shape:
                raise CrossAttentionError(
                    f"Layer {name} attends over {grid.shape[0]} text positions, other layers over "
                    f"{self.sums[key].shape[0]}.")
            self.sums[key] += grid
        else:
            self.sums[key] = grid.clone()
        self.seen_steps.add(self.step)
        if name not in self.seen_layers:
            self.seen_layers.append(name)

    def upsampled(self, positions: list[int], height: int, width: int) -> "torch.Tensor":
        """The sum over grids of each grid's sum at ``positions``, upsampled bilinearly: ``[T, H, W]`` float32."""
        import torch
        import torch.nn.functional as F

        total = torch.zeros(len(positions), height, width, dtype=torch.float32)
        index = torch.tensor(positions, dtype=torch.long)
        for grid in self.sums.values():
            picked = grid.index_select(0, index.to(grid.device)).float()[None]  # [1, T, gh, gw]
            up = F.interpolate(picked, size=(height, width), mode="bilinear", align_corners=False)[0]
            total += up.cpu()
        return total


class _CaptureProcessor:
    """Wraps an ``attn2`` module's processor: records the probabilities, then runs the original."""

    def __init__(self, name: str, original, recorder: _Recorder):
        self.name = name
        self.original = original
        self.recorder = recorder
        params = inspect.signature(original.__call__).parameters
        self._all_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._kwargs = set(params)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.recorder.active:
            import torch

            with torch.no_grad():
                probs = self.recorder.probabilities(attn, hidden_states, encoder_hidden_states, attention_mask)
                self.recorder.add(self.name, probs)
        if not self._all_kwargs:  # what Attention.forward would have passed to the original
            kwargs = {k: v for k, v in kwargs.items() if k in self._kwargs}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


class CrossAttentionRecorder:
    """Installs capture processors on the chosen ``attn2`` modules of ``unet`` (a context manager).

    ``with CrossAttentionRecorder(unet, 64, 64) as rec: pipe(...)`` leaves the running sums
    in ``rec.recorder.sums``; leaving the block (or :meth:`remove`) restores every original
    processor. ``cfg`` says whether the UNet batch is ``[negative, prompt]`` (guidance > 1).
    """

    def __init__(self, unet, latent_h: int, latent_w: int, *, layers: Optional[list[str]] = None,
                 heads: Optional[list[int]] = None, steps: Optional[set[int]] = None, cfg: bool = True):
        modules = _attn2_modules(unet)
        names = list(modules) if layers is None else list(layers)
        self.modules = {name: modules[name] for name in names}
        self.recorder = _Recorder(latent_h, latent_w, heads, steps, cfg)
        self._originals: dict[str, Any] = {}

    def install(self) -> "CrossAttentionRecorder":
        try:
            for name, module in self.modules.items():
                original = module.processor
                self._originals[name] = original
                module.set_processor(_CaptureProcessor(name, original, self.recorder))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for name, original in self._originals.items():
            self.modules[name].set_processor(original)
        self._originals.clear()

    def __enter__(self) -> "CrossAttentionRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


# ----------------------------------------------------------------------------- prompts


def chunk_token_ids(ids: list[int], bos: int, eos: int, pad: int, window: int = WINDOW) -> list[list[int]]:
    """Cut ``ids`` into ``window``-token pieces, each as ``[bos] + piece + [eos] + [pad]*``, ``window + 2`` long.

    An empty ``ids`` gives one empty window ``[bos, eos, pad, ...]`` (how CLIP pipelines
    encode an empty prompt).
    """
    pieces = [ids[i:i + window] for i in range(0, len(ids), window)] or [[]]
    return [[bos] + piece + [eos] + [pad] * (window - len(piece)) for piece in pieces]


def _prompt_ids(pipe, text: str, tokenizer=None) -> list[int]:
    """``tokenizer``'s (default the pipeline's first) ids for ``text`` without special tokens or truncation."""
    tokenizer = pipe.tokenizer if tokenizer is None else tokenizer
    if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion tokens, as the pipeline does
        text = pipe.maybe_convert_prompt(text, tokenizer)
    # tokenize + convert gives the ids __call__ gives, without its "longer than 77" warning
    return list(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))) if text else []


def encode_chunks(pipeline, chunks: list[list[int]]) -> "torch.Tensor":
    """Encode each 77-id window with the text encoder and concatenate: ``[1, 77 * len(chunks), D]``.

    Each window is encoded as the pipeline encodes a prompt (last hidden state, the
    attention mask only where the encoder's config asks for one, the encoder's dtype).
    """
    import torch

    encoder = pipeline.text_encoder
    device = next(encoder.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk], dtype=torch.long, device=device)
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                # as the tokenizer's mask with padding="max_length": 1 up to and including the end token
                real = chunk.index(pipeline.tokenizer.eos_token_id) + 1
                mask = torch.tensor([[1] * real + [0] * (len(chunk) - real)], device=device)
            out.append(encoder(ids, attention_mask=mask)[0].to(dtype=encoder.dtype))
    return torch.cat(out, dim=1)


def encode_chunks_sdxl(pipeline, chunks: list[list[int]], chunks_2: list[list[int]]
                       ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Encode 77-id windows with both SDXL text encoders: ``([1, 77 * C, D1 + D2], [1, P])``.

    Window ``c`` is encoded as the SDXL pipeline encodes a prompt: ``chunks[c]`` (ids of
    ``tokenizer``) by ``text_encoder`` and ``chunks_2[c]`` (ids of ``tokenizer_2``) by
    ``text_encoder_2``, each giving its penultimate hidden states ``[1, 77, D_i]``, which
    are concatenated along the features; the windows are then concatenated along the
    sequence. The pooled embedding ``[1, P]`` is ``text_encoder_2``'s projected output for
    the first window, as A1111 and compel take it. No attention mask, as the pipeline.
    """
    import torch

    if len(chunks) != len(chunks_2):
        raise CrossAttentionError(f"{len(chunks)} windows for text_encoder but {len(chunks_2)} for text_encoder_2.")
    encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
    windows, pooled = [], None
    with torch.no_grad():
        for c, pair in enumerate(zip(chunks, chunks_2)):
            parts = []
            for encoder, chunk in zip(encoders, pair):
                ids = torch.tensor([chunk], dtype=torch.long, device=next(encoder.parameters()).device)
                out = encoder(ids, output_hidden_states=True)
                parts.append(out.hidden_states[-2])
                if c == 0 and encoder is encoders[1]:
                    pooled = out[0]  # CLIPTextModelWithProjection: text_embeds [1, P]
            windows.append(torch.cat([part.to(parts[-1].device) for part in parts], dim=-1))
    dtype = encoders[1].dtype  # the pipeline casts both to text_encoder_2's dtype
    return torch.cat(windows, dim=1).to(dtype=dtype), pooled.to(dtype=dtype)


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id]).strip()
    return text or str(tokenizer.convert_ids_to_tokens(token_id)).replace("</w>", "")


# ----------------------------------------------------------------------------- loading


def _load_pipeline(path: Path, device: str):
    """Load a local ``StableDiffusionPipeline`` (no safety checker) or ``StableDiffusionXLPipeline`` folder.

    The components are checked first, so a missing one is named rather than failing inside diffusers.
    """
    if not path.exists():
        raise ModelError(f"{path} does not exist.")
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise ModelError(f"{path} is not a diffusers pipeline folder (it has no model_index.json).")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index_file} cannot be read as JSON ({_first_line(exc)}).") from None
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in SUPPORTED_PIPELINES:
        raise ModelError(
            f"{path} is a {cls or 'unknown'} pipeline; cross-attention maps support StableDiffusionPipeline "
            f"(SD 1.x / 2.x) and StableDiffusionXLPipeline (SDXL) folders.")
    sdxl = cls == "StableDiffusionXLPipeline"
    for name in SDXL_COMPONENTS if sdxl else REQUIRED_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None or not (path / name).is_dir():
            raise ModelError(f"{path} has no {name} component (model_index.json or the {name}/ folder).")
    # Safetensors only, from the folder only: a pickle (.bin) component could run code when read.
    options: dict[str, Any] = dict(use_safetensors=True, local_files_only=True)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline as loader

        kind = "Stable Diffusion XL"
    else:
        from diffusers import StableDiffusionPipeline as loader

        kind = "Stable Diffusion"
        options.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = loader.from_pretrained(str(path), **options)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot be loaded as a {kind} pipeline ({_load_reason(exc)}).") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _is_sdxl(pipe) -> bool:
    """Whether ``pipe`` has SDXL's second text encoder or tokenizer."""
    return getattr(pipe, "tokenizer_2", None) is not None or getattr(pipe, "text_encoder_2", None) is not None


def _check_loaded(pipe) -> None:
    for name in SDXL_COMPONENTS if _is_sdxl(pipe) else REQUIRED_COMPONENTS:
        if getattr(pipe, name, None) is None:
            raise ModelError(f"The pipeline has no {name} component.")


def _load_reason(exc: BaseException) -> str:
    """Why from_pretrained refused: the missing safetensors file named, else the exception's first line."""
    found = re.search(r"no file named (\S+) found in directory (.+?)\.?$", _first_line(exc))
    if found:
        return (f"{type(exc).__name__}: no {found.group(1)} in {found.group(2)}; only safetensors weights are "
                f"loaded, never pickle .bin files")
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _config_value(pipe, key: str):
    """``pipe.config[key]``, or None when the pipeline has no such config entry."""
    config = getattr(pipe, "config", None)
    try:
        return config.get(key) if config is not None else None
    except AttributeError:
        return getattr(config, key, None)


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, so ours stays one sentence."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CrossAttentionError(f"{name}={value!r} must be a whole number of at least {low}.")
    return value


# ----------------------------------------------------------------------------- the job


def iter_cross_attention(
    pipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    height: int = 512,
    width: int = 512,
    guidance_scale: float = 7.5,
    timesteps: Optional[list[int]] = None,
    layers: Optional[list[str]] = None,
    heads: Optional[list[int]] = None,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
) -> Generator[Progress, None, CrossAttentionMaps]:
    """Generate one image and its per-token cross-attention maps, yielding Progress after each step.

    ``pipeline`` is a local StableDiffusionPipeline or StableDiffusionXLPipeline folder, or a
    loaded pipeline (moved to ``device``); SDXL is recognised by its ``text_encoder_2`` /
    ``tokenizer_2``. ``timesteps`` are step indices ``0..steps-1`` to aggregate (default all),
    ``layers`` ``attn2`` module names or levels ``"down"``/``"mid"``/``"up"`` (default all, see
    :func:`attention_layers`), ``heads``
    head indices (default all). The noise comes from a CPU ``torch.Generator`` seeded with
    ``seed``, so the same seed gives the same image and maps on every device.

    Raises:
        CrossAttentionError / ModelError: bad option, size, layer, step, head or pipeline.
        CancelledError: ``cancel`` was set; the run stops at the next step.
    """
    start = time.monotonic()
    if not isinstance(prompt, str) or not prompt.strip():
        raise CrossAttentionError("prompt is empty; give at least one word to map.")
    if not isinstance(negative_prompt, str):
        raise CrossAttentionError(f"negative_prompt={negative_prompt!r} must be text.")
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value, 8)
        if value % 8:
            raise CrossAttentionError(f"{name}={value} must be a multiple of 8.")
    _check_int("steps", steps, 1)
    _check_int("seed", seed, 0)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise CrossAttentionError(f"guidance_scale={guidance_scale!r} must be a number.")
    wanted: Optional[set[int]] = None
    if timesteps is not None:
        if not list(timesteps):
            raise CrossAttentionError("timesteps is empty; leave it out to aggregate every step.")
        for t in timesteps:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < steps:
                raise CrossAttentionError(f"timesteps contains {t!r}, which is not a step index 0..{steps - 1}.")
        wanted = set(timesteps)

    total = steps + 1  # the denoising steps, then decoding and the maps
    yield Progress(0, total, elapsed_s=time.monotonic() - start, message="loading the pipeline")
    if isinstance(pipeline, (str, os.PathLike)):
        folder = Path(pipeline).expanduser()  # "~/m/sd" as the README writes it
        source = str(folder)
        pipe = _load_pipeline(folder, device)
    else:
        _check_loaded(pipeline)
        source = str(getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path")
                     or type(pipeline).__name__)
        pipe = pipeline.to(device)

    scale = int(getattr(pipe, "vae_scale_factor", 8))
    for name, value in (("height", height), ("width", width)):
        if value % scale:
            raise CrossAttentionError(f"{name}={value} must be a multiple of {scale} (this pipeline's VAE factor).")
    modules = _attn2_modules(pipe.unet)
    if not modules:
        raise ModelError(f"The UNet of {source} has no cross-attention (attn2) layers.")
    if layers is not None:
        if not list(layers):
            raise CrossAttentionError("layers is empty; leave it out to use every cross-attention layer.")
        # A level name ("down", "mid", "up") stands for every cross-attention layer of that level.
        layers = [m for name in layers for m in ([m for m in modules if layer_level(m) == name]
                                                 if name in LEVELS else [name])]
        if not layers:
            raise CrossAttentionError(f"The UNet of {source} has no cross-attention layers at the level(s) asked for; "
                                      f"its layers: {', '.join(modules)}.")
        for name in layers:
            if name not in modules:
                raise CrossAttentionError(f"layers contains {name!r}, which is not one of: {', '.join(modules)}.")
        chosen_layers = list(dict.fromkeys(layers))
    else:
        chosen_layers = list(modules)
    if heads is not None:
        fewest = min(modules[name].heads for name in chosen_layers)
        if not list(heads):
            raise CrossAttentionError("heads is empty; leave it out to sum every head.")
        for hd in heads:
            if isinstance(hd, bool) or not isinstance(hd, int) or not 0 <= hd < fewest:
                raise CrossAttentionError(
                    f"heads contains {hd!r}; the chosen layers have {fewest} heads at least, so use 0..{fewest - 1}.")
        heads = sorted(set(heads))

    # Prompt -> 75-token windows; the maps keep the prompt's own positions only.
    sdxl = _is_sdxl(pipe)
    tok = pipe.tokenizer
    ids = _prompt_ids(pipe, prompt)
    if not ids:
        raise CrossAttentionError("prompt has no tokens after tokenization; give at least one word to map.")
    neg_ids = _prompt_ids(pipe, negative_prompt)
    p_chunks = chunk_token_ids(ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    n_chunks = chunk_token_ids(neg_ids, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    empty = chunk_token_ids([], tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    notes: list[str] = []
    p_count, n_count = len(p_chunks), len(n_chunks)
    zero_negative = False
    if sdxl:
        # text_encoder_2 reads tokenizer_2's ids (the same BPE in released SDXL, another pad token)
        tok2 = pipe.tokenizer_2
        ids2 = _prompt_ids(pipe, prompt, tok2)
        p_chunks2 = chunk_token_ids(ids2, tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id)
        n_chunks2 = chunk_token_ids(_prompt_ids(pipe, negative_prompt, tok2), tok2.bos_token_id,
                                    tok2.eos_token_id, tok2.pad_token_id)
        empty2 = chunk_token_ids([], tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id)
        p_count, n_count = max(p_count, len(p_chunks2)), max(n_count, len(n_chunks2))
        if tok2.convert_ids_to_tokens(ids2) != tok.convert_ids_to_tokens(ids):
            notes.append(f"tokenizer_2 splits the prompt into {len(ids2)} tokens and tokenizer into {len(ids)}; the "
                         f"maps list tokenizer's tokens, and where the splits differ text_encoder_2 put other text "
                         f"at the same positions.")
        # a plain SDXL call without a negative prompt uses zero embeddings when the pipeline says so
        zero_negative = not negative_prompt and bool(_config_value(pipe, "force_zeros_for_empty_prompt"))
        if zero_negative:
            notes.append("The negative prompt is empty and this pipeline sets force_zeros_for_empty_prompt, so the "
                         "unconditional embeddings are zeros, as in a plain call without a negative prompt.")
    n_prompt_chunks = p_count
    width_chunks = max(p_count, n_count)
    if width_chunks > 1:
        notes.append(f"The prompt has {len(ids)} tokens and the negative prompt {len(neg_ids)}: each was cut into "
                     f"{WINDOW}-token windows, encoded separately and concatenated ({width_chunks} windows of 77).")
    if n_count < width_chunks and not zero_negative:
        notes.append(f"The negative prompt was padded with {width_chunks - n_count} empty window(s).")
    if p_count < width_chunks:
        notes.append(f"The prompt was padded with {width_chunks - p_count} empty window(s) to match the "
                     f"longer negative prompt; those windows have no tokens in the maps.")
    p_chunks += empty * (width_chunks - len(p_chunks))
    n_chunks += empty * (width_chunks - len(n_chunks))
    if sdxl:
        p_chunks2 += empty2 * (width_chunks - len(p_chunks2))
        n_chunks2 += empty2 * (width_chunks - len(n_chunks2))
    # token j of window c sits at 77 * c + 1 + j in the concatenated embeddings (after its start token)
    token_chunks = [i // WINDOW for i in range(len(ids))]
    positions = [(WINDOW + 2) * (i // WINDOW) + 1 + i % WINDOW for i in range(len(ids))]
    tokens = [_token_text(tok, i) for i in ids]

    import numpy as np
    import torch

    cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    recorder_ctx = CrossAttentionRecorder(pipe.unet, height // scale, width // scale, layers=chosen_layers,
                                          heads=heads, steps=wanted, cfg=cfg)
    rec = recorder_ctx.recorder
    call: dict[str, Any] = dict(num_inference_steps=steps, height=height, width=width,
                                guidance_scale=float(guidance_scale), output_type="np",
                                generator=torch.Generator("cpu").manual_seed(seed))
    if width_chunks == 1:  # the pipeline's own encoding: exactly what a plain call does
        call.update(prompt=prompt, negative_prompt=None if zero_negative else negative_prompt)
    elif sdxl:
        embeds, pooled = encode_chunks_sdxl(pipe, p_chunks, p_chunks2)
        if zero_negative:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = encode_chunks_sdxl(pipe, n_chunks, n_chunks2)
        call.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_embeds,
                    negative_pooled_prompt_embeds=neg_pooled)
    else:
        call.update(prompt_embeds=encode_chunks(pipe, p_chunks), negative_prompt_embeds=encode_chunks(pipe, n_chunks))

    # The pipeline call blocks, so it runs in a worker thread that waits at every step's
    # callback until this generator is resumed: the caller sees Progress between steps
    # and closing the generator stops the run at the next step.
    to_main: "queue.Queue[tuple[str, Any]]" = queue.Queue()
    to_worker: "queue.Queue[str]" = queue.Queue()

    class _Stop(BaseException):
        """Raised inside the pipeline call when the generator was closed."""

    def on_step_end(_pipe, i, _t, kwargs):
        rec.step = i + 1
        to_main.put(("step", i))
        if to_worker.get() == "stop":
            raise _Stop()
        if cancel is not None and cancel.cancelled:
            raise CancelledError()
        return kwargs

    def work():
        try:
            to_main.put(("done", pipe(**call, callback_on_step_end=on_step_end)))
        except BaseException as exc:  # handed to the generator, which raises it
            to_main.put(("error", exc))

    worker: Optional[threading.Thread] = None
    recorder_ctx.install()
    try:
        if cancel is not None and cancel.cancelled:
            raise CancelledError()
        worker = threading.Thread(target=work, name="cross-attention", daemon=True)
        worker.start()
        while True:
            kind, value = to_main.get()
            if kind == "error":
                raise value
            if kind == "done":
                output = value
                break
            # schedulers with several model calls per step (Heun) run more loop iterations than steps
            yield Progress(min(value + 1, steps), total, elapsed_s=time.monotonic() - start,
                           message=f"step {value + 1}/{steps}")
            if cancel is not None and cancel.cancelled:
                raise CancelledError()
            to_worker.put("go")
    finally:
        if worker is not None and worker.is_alive():
            to_worker.put("stop")
            worker.join()
        recorder_ctx.remove()

    ran = rec.step
    if ran != steps:
        notes.append(f"The scheduler ran {ran} denoising iterations for steps={steps}.")
    if not rec.sums:
        raise CrossAttentionError("No cross-attention was captured: none of the chosen steps and layers ran.")
    raw = rec.upsampled(positions, height, width)  # [T, H, W]
    raw_max = raw.flatten(1).amax(dim=1)
    maps = torch.where(raw_max[:, None, None] > 0, raw / raw_max.clamp_min(1e-30)[:, None, None], torch.zeros_like(raw))
    image = np.clip(np.rint(output.images[0] * 255.0), 0, 255).astype(np.uint8)
    missing = [name for name in chosen_layers if name not in rec.seen_layers]
    if missing:
        notes.append(f"These layers never ran and add nothing: {', '.join(missing)}.")
    result = CrossAttentionMaps(
        pipeline=source, prompt=prompt, negative_prompt=negative_prompt, tokens=tokens, token_chunks=token_chunks,
        maps=maps.numpy().astype(np.float32), raw_max=[float(v) for v in raw_max], image=image,
        height=height, width=width, steps=steps, seed=seed, guidance_scale=float(guidance_scale),
        timesteps=sorted(rec.seen_steps), layers=[n for n in chosen_layers if n in rec.seen_layers],
        heads="all" if heads is None else ",".join(map(str, heads)), chunks=n_prompt_chunks, notes=notes,
    )
    yield Progress(total, total, elapsed_s=time.monotonic() - start, message="done")
    return result


def cross_attention(pipeline, prompt: str, **kw) -> CrossAttentionMaps:
    """Run :func:`iter_cross_attention` to the end (``cancel=`` is honoured) and return its maps."""
    return drive(iter_cross_attention(pipeline, prompt, **kw), cancel=kw.get("cancel"))
