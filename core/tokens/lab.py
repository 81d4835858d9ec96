"""The engine behind the app's Tokens panel: a model, an input, a setting -> figures and merged-token views.

What the panel does, without Qt (usable from a notebook too)::

    from core.tokens import lab
    model = lab.load_model("models/vit-base")               # ViT/DeiT/CLIP vision, BERT, UNet, pipeline
    work = lab.make_workload(model, lab.LabInput())          # the first sample image
    ranges = lab.legal_ranges(model, work, "tome")           # {"r": (0, 16), "threshold": (0.0, 1.0), ...}
    result = drive(lab.iter_evaluate(model, work, "tome", {"r": 13}))   # core.jobs.drive
    result.speedup, result.cosine, result.tokens_per_layer, result.groups.groups[-1]

* The measurement is :func:`core.tokens.bench.iter_run` (the one behind ``mergestudio
  tokens bench``: warm, alternating, medians, peak memory, fidelity), one forward per
  yielded :class:`~core.jobs.Progress`, so a worker can stop it between forwards;
  closing the generator removes the patch and leaves the model exactly as before.
* Option errors are the engine's own one-sentence :class:`TokenMergeError`\\ s, raised
  before any forward -- including those that depend on the input (an r too large for
  this sentence, a ToDo factor larger than a block's token grid).
* A setting that patches but changes nothing (r = 0, a tomesd ratio so small that
  ``int(ratio * N)`` is 0 everywhere, ``downsample_factor=1``) is not an exception:
  ``touched_blocks`` is 0 and ``notes[0]`` says why; the panel shows it as an error.
* Merged-token views (:class:`GroupView`): for images and text, the token groups of the
  first sample after every layer (from ``handle.layer_assignments``); for UNets, the
  groups of one chosen block (``handle.record_block``), at the workload's timestep.

UNet inputs are a classifier-free-guidance batch, as a pipeline calls its UNet:
``[unconditional, conditional]`` halves (the same latents; the empty prompt and the
prompt), so ``batch`` prompts make a UNet batch of ``2 * batch``.

torch, transformers, diffusers and Pillow are imported lazily.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import MergeStudioError, ModelError
from core.jobs import Progress
from core.tokens import bench
from core.tokens.bipartite import TokenMergeError

SUPPORTED = "ViT, DeiT and CLIP vision towers (transformers), BERT-style encoders, diffusers UNets and pipelines"
"""What :func:`load_model` accepts, in words (the panel shows it)."""

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "resources" / "samples"
SAMPLE_ORDER = ("scene.png", "chart.png", "shapes.png")
DEFAULT_PROMPT = "a red house beside a tree under a blue sky"
DEFAULT_RESOLUTION = bench.DEFAULT_UNET_RESOLUTION
TRAIN_TIMESTEPS = 1000

# transformers model types the encoder methods patch (checked before loading any weights).
_MODEL_TYPES = ("vit", "deit", "clip", "clip_vision_model", "bert")

__all__ = [
    "GroupView",
    "LabError",
    "LabInput",
    "LabModel",
    "LabResult",
    "SUPPORTED",
    "iter_evaluate",
    "iter_sweep",
    "legal_ranges",
    "load_model",
    "make_workload",
    "python_line",
    "sample_images",
]


class LabError(MergeStudioError):
    """An input the Tokens panel cannot use (image, sentence, batch, timestep, sweep values)."""


def sample_images() -> list[Path]:
    """The shipped sample images (``resources/samples/*.png``): scene, chart, shapes, then any others."""
    found = {p.name: p for p in SAMPLES_DIR.glob("*.png")}
    ordered = [found.pop(name) for name in SAMPLE_ORDER if name in found]
    return ordered + [found[name] for name in sorted(found)]


# --------------------------------------------------------------------------- models


@dataclass
class LabModel:
    """A model loaded for the panel.

    ``pipeline`` is the diffusers pipeline when the folder is one and diffusers can
    assemble it (None otherwise); ``text_encoder`` / ``prompt_tokenizer`` encode
    prompts for a UNet (the pipeline's, or loaded from the folder's ``text_encoder/``
    and ``tokenizer/`` when diffusers cannot assemble the whole pipeline).
    """

    path: Path
    loaded: bench.Loaded
    kind: str  # "vit" | "bert" | "unet"
    name: str
    pipeline: Any | None = None
    text_encoder: Any | None = None
    prompt_tokenizer: Any | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def model(self):
        """The torch module that is patched and timed (a pipeline's UNet for pipelines)."""
        return self.loaded.model


def load_model(path, *, device: str = "cpu", dtype=None) -> LabModel:
    """Load a local model folder for the panel; anything else is a one-sentence :class:`ModelError`.

    Accepted: Hugging Face ViT, DeiT, CLIP (its vision tower) and BERT folders, diffusers
    UNet folders and pipeline folders (their UNet, plus the text encoder for prompts).
    Other model types are refused from their ``config.json``, before any weight is read.
    """
    folder = bench.check_folder(path)
    _check_supported(folder)
    loaded = bench.load(folder, dtype=dtype, device=device)
    if loaded.kind is None:
        raise ModelError(
            f"{folder} holds a {type(loaded.model).__name__}, which token merging cannot patch; supported: {SUPPORTED}."
        )
    model = LabModel(folder, loaded, loaded.kind, folder.name, notes=list(loaded.notes))
    if (folder / "model_index.json").is_file():
        _load_prompt_encoder(model)
    return model


def _check_supported(folder: Path) -> None:
    """Refuse folders whose config names a model the panel cannot patch (cheap: reads JSON only)."""
    if (folder / "model_index.json").is_file() or not (folder / "config.json").is_file():
        return  # bench.load explains pipelines without a UNet and folders without a config
    config_path = folder / "config.json"
    config = _read_json(config_path, ModelError)
    if "_class_name" in config:
        name = config["_class_name"]
        if name != "UNet2DConditionModel":
            raise ModelError(
                f"{config_path} describes a diffusers {name}, which token merging cannot patch; supported: {SUPPORTED}."
            )
        return
    model_type = config.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
        architectures = config.get("architectures")
        shown = architectures[0] if isinstance(architectures, list) and architectures else f"{model_type!r} model"
        raise ModelError(
            f"{folder} holds a {shown} (model_type {model_type!r}), which token merging cannot patch; "
            f"supported: {SUPPORTED}."
        )


def _read_json(path: Path, error: type[MergeStudioError]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not readable JSON ({' '.join(str(problem).split())}).") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object.")
    return data


def _quiet_libraries():
    """Context manager: diffusers/transformers log errors only (no warnings, no progress bars)."""
    import contextlib
    import logging
    import warnings

    @contextlib.contextmanager
    def quiet():
        loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        bars = []
        for module in ("diffusers.utils.logging", "transformers.utils.logging"):
            try:
                utils = __import__(module, fromlist=["is_progress_bar_enabled"])
            except ImportError:  # pragma: no cover - both are dependencies
                continue
            if utils.is_progress_bar_enabled():
                utils.disable_progress_bar()
                bars.append(utils)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecation notices about the folder's configs
                yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            for utils in bars:
                utils.enable_progress_bar()

    return quiet()


# Pipeline parts prompts do not need: not loaded (a VAE or safety checker is large).
_SKIPPED_PARTS = ("vae", "safety_checker", "feature_extractor", "image_encoder")


def _load_prompt_encoder(model: LabModel) -> None:
    """The pipeline (when diffusers assembles it) or its text encoder and tokenizer, for prompts.

    The pipeline shares the already loaded UNet; its VAE, safety checker, feature
    extractor and image encoder are not loaded (None): prompts do not need them.
    """
    folder = model.path
    index = _read_json(folder / "model_index.json", ModelError)
    unet = model.loaded.model
    param = next(unet.parameters())
    try:
        from diffusers import DiffusionPipeline

        skip = {name: None for name in _SKIPPED_PARTS if name in index}
        with _quiet_libraries():
            pipeline = DiffusionPipeline.from_pretrained(str(folder), unet=unet, use_safetensors=True, **skip)
            pipeline.to(param.device)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
    except Exception as error:  # an incomplete folder: load what prompts need on their own
        model.notes.append(
            f"diffusers could not assemble the pipeline {folder.name} ({bench._short(error, 200)}); its UNet and "
            "text encoder are used on their own."
        )
        model.text_encoder = _text_encoder(folder, index, param)
        model.prompt_tokenizer = _prompt_tokenizer(folder)
        return
    model.pipeline = pipeline
    model.text_encoder = getattr(pipeline, "text_encoder", None)
    model.prompt_tokenizer = getattr(pipeline, "tokenizer", None)


def _text_encoder(folder: Path, index: dict, param):
    entry = index.get("text_encoder")
    sub = folder / "text_encoder"
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers"):
        return None
    if not (sub / "config.json").is_file() or not any(sub.glob("*.safetensors")):
        return None
    import transformers

    cls = getattr(transformers, str(entry[1]), None)
    if cls is None:
        return None
    try:
        with _quiet_libraries():
            encoder = cls.from_pretrained(str(sub), use_safetensors=True, dtype=param.dtype)
    except Exception as error:
        raise ModelError(f"could not load the text encoder {sub}: {bench._short(error)}") from None
    return encoder.to(param.device).eval()


def _prompt_tokenizer(folder: Path):
    sub = folder / "tokenizer"
    if not sub.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(sub))
    except Exception as error:
        raise ModelError(f"could not load the tokenizer {sub}: {bench._short(error)}") from None


# --------------------------------------------------------------------------- inputs


@dataclass
class LabInput:
    """What the model reads: an image (vision), a sentence (text) or a prompt (UNet).

    None picks the first sample image / the first sample sentence / a default
    prompt. ``timestep`` and ``resolution`` (pixels, a multiple of 8; default 512)
    are for UNets; ``batch`` repeats the input (a UNet sees ``2 * batch``:
    unconditional and conditional halves).
    """

    image: Path | None = None
    text: str | None = None
    prompt: str | None = None
    timestep: int = 500
    resolution: int | None = None
    batch: int = 1


def _whole(name: str, value, low: int, high: int | None = None) -> int:
    too_high = high is not None and value > high
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or too_high:
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise LabError(f"{name}={value!r} must be a whole number {span}.")
    return int(value)


def make_workload(model: LabModel, inp: LabInput) -> bench.Workload:
    """The fixed inputs that :func:`iter_evaluate` times, built from ``inp`` for ``model``.

    ``extras`` of the result keeps what the views need: ``image`` (the picture the model
    saw, uint8 ``[S, S, 3]``) and ``grid``; ``tokens`` (sample 0's token strings); the
    UNet's ``prompt``.
    """
    batch = _whole("batch", inp.batch, 1)
    if model.kind == "vit":
        return _image_workload(model, inp, batch)
    if model.kind == "bert":
        return _text_workload(model, inp, batch)
    return _unet_workload(model, inp, batch)


def _image_workload(model: LabModel, inp: LabInput, batch: int) -> bench.Workload:
    import numpy as np
    import torch

    config = model.model.config
    vision = getattr(config, "vision_config", config)
    size = vision.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    patch = vision.patch_size
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    channels = int(getattr(vision, "num_channels", 3))
    if channels != 3:
        raise LabError(f"{model.path} expects images with {channels} channels; the panel feeds RGB pictures.")
    mean, std, resample, notes = _preprocessing(model.path, channels)
    path = Path(inp.image) if inp.image is not None else sample_images()[0]
    picture = _read_image(path, size, resample)
    values = (picture.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    pixels = torch.from_numpy(values).permute(2, 0, 1)[None].expand(batch, -1, -1, -1)
    work = bench.workload(
        model.model, kind="vit", batch=batch, resolution=inp.resolution, notes=[*model.notes, *notes],
        description=model.loaded.description,
    )
    param = next(model.model.parameters())
    side = size // patch
    return replace(
        work,
        inputs={"pixel_values": pixels.to(device=param.device, dtype=param.dtype).contiguous()},
        input_text=f"{path.name} as {size}x{size} px ({work.tokens} tokens) x {batch}",
        extras={"image": picture, "image_path": str(path), "grid": (side, side)},
    )


def _preprocessing(folder: Path, channels: int) -> tuple[list, list, int | None, list[str]]:
    """Mean, std and resampling filter from ``preprocessor_config.json`` (0.5/0.5 without one)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        note = f"{folder.name} has no preprocessor_config.json: pixels are normalised with mean 0.5 and std 0.5."
        return [0.5] * channels, [0.5] * channels, None, [note]
    config = _read_json(path, LabError)
    values = []
    for name in ("image_mean", "image_std"):
        value = config.get(name, [0.5] * channels)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = [value] * channels
        ok = isinstance(value, list) and len(value) == channels
        ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (name == "image_std" and min(value) <= 0):
            raise LabError(f"{path}: {name} must be {channels} finite numbers{' above 0' if 'std' in name else ''}.")
        values.append([float(v) for v in value])
    resample = config.get("resample")
    resample = resample if isinstance(resample, int) and not isinstance(resample, bool) and 0 <= resample <= 5 else None
    return values[0], values[1], resample, []


def _read_image(path: Path, size: int, resample: int | None):
    """The picture at ``path`` as RGB uint8 ``[size, size, 3]``: scaled to cover, then center-cropped."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise LabError(f"cannot read the image {path}: the file does not exist.") from None
    except UnidentifiedImageError:
        raise LabError(f"cannot read the image {path}: it is not an image format Pillow knows.") from None
    except Image.DecompressionBombError:
        raise LabError(
            f"cannot read the image {path}: it has too many pixels (Pillow's decompression-bomb limit)."
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise LabError(f"cannot read the image {path}: {bench._short(error, 160)}.") from None
    method = Image.Resampling(resample) if resample is not None else Image.Resampling.BICUBIC
    fitted = ImageOps.fit(rgb, (size, size), method=method, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8).copy()


def _text_workload(model: LabModel, inp: LabInput, batch: int) -> bench.Workload:
    text = inp.text if inp.text is not None else bench.read_sentences()[0]
    if not isinstance(text, str) or not text.strip():
        raise LabError("the sentence is empty; type one, or leave it unset for the sample sentence.")
    tokenizer = model.loaded.tokenizer
    work = bench.workload(
        model.model, kind="bert", batch=batch, tokenizer=tokenizer, sentences=[text], notes=list(model.notes),
        description=model.loaded.description,
    )
    ids = work.inputs["input_ids"][0][work.inputs["attention_mask"][0].bool()].tolist()
    if tokenizer is not None:
        tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    else:
        tokens = bench.hash_tokens(text, int(getattr(model.model.config, "max_position_embeddings", 512)))
    shown = text if len(text) <= 60 else text[:57] + "..."
    return replace(
        work,
        input_text=f'"{shown}" ({len(tokens)} tokens) x {batch}',
        extras={"text": text, "tokens": tokens},
    )


def _unet_workload(model: LabModel, inp: LabInput, batch: int) -> bench.Workload:
    import torch

    resolution = DEFAULT_RESOLUTION if inp.resolution is None else _whole("resolution", inp.resolution, 8)
    if resolution % 8:
        raise LabError(f"resolution={resolution} must be a multiple of 8 (the VAE downsamples by 8).")
    steps = TRAIN_TIMESTEPS
    scheduler = getattr(model.pipeline, "scheduler", None)
    if scheduler is not None:
        steps = int(getattr(scheduler.config, "num_train_timesteps", steps))
    timestep = _whole("timestep", inp.timestep, 0, steps - 1)
    prompt = inp.prompt if inp.prompt is not None else DEFAULT_PROMPT
    notes = list(model.notes)
    work = bench.workload(
        model.model, kind="unet", batch=2 * batch, resolution=resolution, notes=notes,
        description=model.loaded.description,
    )
    inputs = dict(work.inputs)
    latents = inputs["sample"][:batch]
    inputs["sample"] = torch.cat([latents, latents])
    inputs["timestep"] = torch.tensor(timestep, device=latents.device)
    embeddings, how = _prompt_embeddings(model, prompt, work, notes)
    if embeddings is not None:
        uncond, cond = embeddings
        inputs["encoder_hidden_states"] = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
    side = resolution // 8
    notes.append(
        f"the UNet sees a classifier-free-guidance batch of {2 * batch}: [unconditional, conditional] halves, "
        "as a pipeline calls it."
    )
    return replace(
        work,
        inputs=inputs,
        input_text=(
            f"{batch} latent(s) of {resolution}x{resolution} px ({side}x{side} = {side * side} tokens at full "
            f"resolution) x 2 for guidance, {how}, timestep {timestep}"
        ),
        notes=notes,
        extras={"prompt": prompt, "timestep": timestep, "real_text": embeddings is not None},
    )


def _prompt_embeddings(model: LabModel, prompt: str, work: bench.Workload, notes: list[str]):
    """``(unconditional, conditional)`` ``[1, T, D]`` from the text encoder, or (None, why) for random ones."""
    import torch

    encoder, tokenizer = model.text_encoder, model.prompt_tokenizer
    unet = model.model
    cross = unet.config.cross_attention_dim
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    why = None
    if encoder is None:
        is_pipeline = (model.path / "model_index.json").is_file()
        why = "the pipeline has no loadable text_encoder/" if is_pipeline else "a UNet folder has no text encoder"
    elif tokenizer is None:
        why = "the pipeline has no tokenizer/"
    elif getattr(unet.config, "addition_embed_type", None) == "text_time" or hasattr(model.pipeline, "text_encoder_2"):
        why = "SDXL-style pipelines (two text encoders) are not encoded here"
    if why is None:
        config = encoder.config
        limit = int(getattr(config, "max_position_embeddings", 77))
        length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        param = next(encoder.parameters())
        encoded = tokenizer(
            ["", prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = encoder(encoded["input_ids"].to(param.device))[0]
        if hidden.shape[-1] != cross:
            why = f"the text encoder gives {hidden.shape[-1]} features, the UNet's cross-attention takes {cross}"
        else:
            hidden = hidden.to(device=work.inputs["sample"].device, dtype=work.inputs["sample"].dtype).clone()
            return (hidden[:1], hidden[1:]), f'prompt "{prompt}" ({hidden.shape[1]} text tokens)'
    notes.append(f"random text embeddings instead of the prompt: {why}.")
    return None, f"random text embeddings ({bench.UNET_TEXT_TOKENS} tokens)"


# --------------------------------------------------------------------------- legal ranges


def _spec(method: str):
    from core.tokens import api

    api._ensure_builtin_methods()
    if method not in api._METHODS:
        raise TokenMergeError(
            f"method={method!r} is not a token-merging method; use one of {', '.join(api._METHODS)}."
        )
    return api._METHODS[method]


def _encoder_target(model: LabModel, method: str):
    from core.tokens import api, diffusion

    if method in diffusion.METHODS:
        raise diffusion._unsupported(model.model, method)
    return api._find_target(model.model)  # a UNet: the engine's "use tomesd or todo"


def _real_lengths(work: bench.Workload) -> list[int]:
    """Each sample's real token count when the batch is right-padded (as the engine checks r), else []."""
    mask = work.inputs.get("attention_mask")
    if mask is None or bool(mask.bool().all()):
        return []
    import torch

    valid = mask.bool()
    counts = valid.sum(1)
    prefix = torch.arange(valid.shape[1], device=valid.device)[None, :] < counts[:, None]
    return sorted(set(counts.tolist())) if bool((prefix == valid).all()) else []


def _width(work: bench.Workload, target=None) -> int:
    """Tokens entering the first layer: the text's padded width, or the vision model's patches + special tokens."""
    ids = work.inputs.get("input_ids")
    if ids is not None:
        return int(ids.shape[1])
    return int(getattr(target, "num_tokens", None) or work.tokens)


def _r_fits(spec, r: int, layers: int, tokens: int, protected: int, lengths: list[int]) -> bool:
    """Whether the engine accepts a constant ``r`` for this input (its own checks, in its order)."""
    from core.tokens.bipartite import parse_r

    try:
        schedule = parse_r(r, layers, tokens, protected=protected)
        if spec.check_schedule is not None:
            spec.check_schedule(schedule, tokens, protected)
        for length in lengths:
            length = max(length, 1)
            parse_r(r, layers, length, protected=min(protected, length))
            if spec.check_schedule is not None:
                spec.check_schedule(schedule, length, min(protected, length))
    except TokenMergeError:
        return False
    return True


def _diffusion_grids(model: LabModel, work: bench.Workload, method: str, options: dict) -> list[tuple[int, int]]:
    """The token grid ``(h, w)`` of every block ``method`` would patch with ``options`` on this input."""
    from core.tokens import diffusion

    unet = diffusion.find_unet(model.model)
    blocks = diffusion._transformer_blocks(unet)
    if not blocks:
        return []
    level = diffusion._max_downsample(options.get("max_downsample"), [b.level for b in blocks])
    selected = [b for b in blocks if b.level <= level]
    if method == "todo":
        selected = [b for b in selected if diffusion._todo_ready(b.module) is None]
    height, width = work.inputs["sample"].shape[-2:]
    return [(-(-int(height) // b.level), -(-int(width) // b.level)) for b in selected]


def legal_ranges(model: LabModel, work: bench.Workload, method: str, options: dict | None = None) -> dict[str, tuple]:
    """What each control of ``method`` may span for THIS model and input: ``{option: (low, high)}`` or choices.

    * ``r``: ``(0, largest constant r the engine accepts)`` for this input's token count,
      layer count and protected tokens (``protect_cls`` from ``options``): every layer
      must still have tokens to merge, so this is below ``bipartite.max_r`` at layer 0.
    * ``threshold``: ``(0.0, 1.0)`` (cosine similarities; the engine also takes -1..0,
      which merges nearly everything).
    * tomesd: ``ratio`` ``(0, max_ratio(sx, sy))``; ``sx`` / ``sy`` up to the smallest
      patched block's grid width / height; ``max_downsample`` the UNet's levels.
    * todo: ``downsample_factor`` ``(1, smallest side of a patched block's grid)``.
    * choices (``max_downsample``, ``downsample_method``) as tuples; other numbers from
      the method's schema (None: unbounded); bool options are left out.
    """
    from core.tokens import diffusion

    options = dict(options or {})
    spec = _spec(method)
    if method in diffusion.METHODS:
        if model.kind != "unet":
            raise diffusion._unsupported(model.model, method)
        sx = 2 if options.get("sx") is None else options["sx"]
        sy = 2 if options.get("sy") is None else options["sy"]
        ranges = dict(diffusion.legal_ranges(method, model.model, sx=sx, sy=sy))
        grids = _diffusion_grids(model, work, method, options)
        if grids:
            if method == "tomesd":
                ranges["sx"] = (1, min(w for _, w in grids))
                ranges["sy"] = (1, min(h for h, _ in grids))
            else:
                ranges["downsample_factor"] = (1, min(min(g) for g in grids))
        return ranges
    target = _encoder_target(model, method)
    protect = options.get("protect_cls")
    protected = target.special_tokens if protect is None or protect is True else 0
    layers, tokens, lengths = len(target.layers), _width(work, target), _real_lengths(work)
    from core.tokens.bipartite import max_r

    top = max_r(tokens, protected=min(protected, tokens))
    while top > 0 and not _r_fits(spec, top, layers, tokens, protected, lengths):
        top -= 1
    ranges: dict[str, tuple] = {}
    for param in spec.parameters:
        if param.type == "bool":
            continue
        if param.name == "r":
            ranges["r"] = (0, top)
        elif param.name == "threshold":
            ranges["threshold"] = (0.0, 1.0)
        elif param.type == "choice":
            ranges[param.name] = tuple(param.choices or ())
        else:
            ranges[param.name] = tuple(param.range) if param.range is not None else (None, None)
    return ranges


# --------------------------------------------------------------------------- results


@dataclass
class GroupView:
    """Which input tokens merged together, for display.

    ``groups[k][i]`` is the group id of input token ``i`` of sample 0 after label ``k``:
    tokens with the same id are one merged token. Images: patches only (class and
    distillation tokens left out), row-major over ``grid``, ids are the index of the
    token in that layer's output. Text: the real tokens (padding left out). Diffusion:
    one block, ids are the destination token's index in the block's grid (tomesd) or
    the key/value cell (todo).
    """

    kind: str  # "image" | "text" | "diffusion"
    labels: list[str]
    groups: list[list[int]]
    grid: tuple[int, int] | None
    image: Any | None
    tokens: list[str] | None
    counts_per_input: list[float] | None
    group_counts: list[int] = field(default_factory=list)  # distinct ids per label
    block_index: int | None = None  # diffusion: the patched block shown


@dataclass
class LabResult:
    """One measured setting: the panel's figures, chart data and merged-token view."""

    method: str
    options: dict
    speedup: float | None
    time_plain_s: float
    time_merged_s: float
    peak_memory_plain_bytes: int | None
    peak_memory_merged_bytes: int | None
    fidelity_metric: str
    cosine: float | None
    relative_error: float | None
    tokens_per_layer: list[float]
    layer_labels: list[str]
    input_tokens: int
    output_tokens: float | None
    touched_blocks: int
    groups: GroupView | None
    bench: dict
    notes: list[str]
    tokens_measure: str = ""  # what tokens_per_layer counts
    input_tokens_per_layer: list[int] | None = None  # UNets: tokens entering each block call

    def figures(self) -> dict:
        """A JSON-ready summary for the session store (numbers and short lists; no arrays or images)."""
        out = {
            "method": self.method,
            "options": self.options,
            "speedup": self.speedup,
            "speedup_best": self.bench.get("speedup_best"),
            "time_plain_s": self.time_plain_s,
            "time_merged_s": self.time_merged_s,
            "peak_memory_plain_bytes": self.peak_memory_plain_bytes,
            "peak_memory_merged_bytes": self.peak_memory_merged_bytes,
            "memory_measure": self.bench.get("memory_measure"),
            "fidelity_metric": self.fidelity_metric,
            "cosine": self.cosine,
            "cosine_min": self.bench.get("cosine_min"),
            "relative_error": self.relative_error,
            "tokens_per_layer": self.tokens_per_layer,
            "layer_labels": self.layer_labels,
            "tokens_measure": self.tokens_measure,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "touched_blocks": self.touched_blocks,
            "counts_per_input": self.groups.counts_per_input if self.groups is not None else None,
            "group_counts": self.groups.group_counts if self.groups is not None else None,
            "model": self.bench.get("model"),
            "input": self.bench.get("input"),
            "batch": self.bench.get("batch"),
            "device": self.bench.get("device"),
            "runs": self.bench.get("runs"),
            "warmup": self.bench.get("warmup"),
            "restored_exactly": self.bench.get("restored_exactly"),
            "notes": list(self.notes),
        }
        return bench._jsonable(out)


# --------------------------------------------------------------------------- evaluation


def _precheck(model: LabModel, work: bench.Workload, method: str, options: dict) -> None:
    """The engine's errors for these options on this input, before any forward (patch applied and removed)."""
    from core import tokens

    if work.model is not model.model:
        raise LabError("the workload was made for another model; call make_workload with this model.")
    handle = tokens.apply(model.model, method=method, **options)
    try:
        if model.kind == "unet":
            _check_grids(model, work, method, handle.options)
        elif handle.options.get("r") is not None:
            valid = work.inputs.get("attention_mask")
            valid = None if valid is None or bool(valid.bool().all()) else valid.bool()
            handle._schedule(_width(work, handle.target), valid)  # the engine's own check of r for this input
    finally:
        handle.remove()


def _check_grids(model: LabModel, work: bench.Workload, method: str, opts: dict) -> None:
    grids = _diffusion_grids(model, work, method, opts)
    if not grids:
        return
    if method == "todo":
        factor, side = opts["downsample_factor"], min(min(g) for g in grids)
        if factor > side:
            raise TokenMergeError(
                f"downsample_factor={factor} is larger than the smallest patched token grid of this input "
                f"({side} tokens a side); use at most {side}, or lower max_downsample."
            )
        return
    sx, sy = opts["sx"], opts["sy"]
    for h, w in grids:  # the engine's run-time condition: a block that merges needs one full cell
        if int(h * w * opts["ratio"]) > 0 and (h // sy) * (w // sx) == 0:
            raise TokenMergeError(
                f"sx x sy = {sx}x{sy} is larger than a patched {h}x{w} token grid of this input, which then has no "
                "destination token; lower sx/sy or max_downsample."
            )


def iter_evaluate(
    model: LabModel,
    work: bench.Workload,
    method: str,
    options: dict,
    *,
    runs: int = 3,
    warmup: int = 1,
    group_block: int | None = None,
    collect_garbage: bool = True,
) -> Generator[Progress, None, LabResult]:
    """Measure ``method`` with ``options`` on ``work`` (as :func:`core.tokens.bench.run`), yielding after each forward.

    Returns a :class:`LabResult`. ``group_block`` (UNets only; None: the first patched
    block) picks the block whose groups the view shows; encoders show every layer.
    Option errors raise before any forward; closing the generator removes the patch.
    ``collect_garbage=False`` (GUI workers) leaves garbage collection to the GUI thread.
    """
    options = dict(options)
    _precheck(model, work, method, options)
    capture: dict = {}
    block = 0 if group_block is None else group_block

    def on_apply(handle) -> None:
        if model.kind == "unet":
            handle.record_block(block)

    def on_merged(handle, output) -> None:
        capture["stats"] = handle.stats
        if model.kind == "unet":
            capture["groups"] = handle.block_groups
            capture["names"] = dict(zip(handle.blocks, handle.block_names()))
        else:
            capture["assignments"] = handle.layer_assignments
            capture["specials"] = handle.target.special_tokens

    result = yield from bench.iter_run(
        work, method, options, runs, warmup, on_apply=on_apply, on_merged=on_merged, collect_garbage=collect_garbage
    )
    return _lab_result(model, work, method, options, result, capture)


def _lab_result(
    model: LabModel, work: bench.Workload, method: str, options: dict, result: dict, capture: dict
) -> LabResult:
    stats = capture.get("stats") or {}
    if model.kind == "unet":
        names = capture.get("names", {})
        labels = [names.get(name, name) for name in stats.get("layer_names", [])]
        inputs = list(stats.get("input_tokens_per_layer", []))
        if method == "todo":
            counts, measure = list(stats.get("kv_tokens_per_layer", [])), "key/value tokens of each self-attention"
        else:
            counts, measure = list(stats.get("tokens_per_layer", [])), "tokens the merged branches process"
        touched = sum(1 for count, total in zip(counts, inputs) if count < total)
        view = _diffusion_view(capture.get("groups"))
    else:
        counts = list(stats.get("tokens_per_layer", []))
        labels = [f"layer {i}" for i in range(len(counts))]
        inputs, measure = None, "tokens entering each layer"
        flow = [*counts, stats.get("output_tokens")]
        touched = sum(1 for before, after in zip(flow, flow[1:]) if after is not None and after < before)
        view = _encoder_view(model, work, capture, stats)
    notes = list(result.get("notes", []))
    if touched == 0:
        notes.insert(0, _no_change(model, method, options, stats, inputs))
    return LabResult(
        method=method,
        options=dict(options),  # as given: a tuple is an (r, inflection) pair, a list one r per layer
        speedup=result["speedup"],
        time_plain_s=result["time_plain_s"],
        time_merged_s=result["time_merged_s"],
        peak_memory_plain_bytes=result["peak_memory_plain_bytes"],
        peak_memory_merged_bytes=result["peak_memory_merged_bytes"],
        fidelity_metric=result["fidelity_metric"],
        cosine=result.get("cosine"),
        relative_error=result.get("relative_error"),
        tokens_per_layer=counts,
        layer_labels=labels,
        input_tokens=int(result.get("input_tokens") or work.tokens or 0),
        output_tokens=result.get("output_tokens"),
        touched_blocks=touched,
        groups=view,
        bench=result,
        notes=notes,
        tokens_measure=measure,
        input_tokens_per_layer=inputs,
    )


def _no_change(model: LabModel, method: str, options: dict, stats: dict, inputs: list | None) -> str:
    """notes[0] when the patch changed no layer or block: why, in one sentence."""
    if model.kind != "unet":
        if options.get("threshold") is not None:
            return (
                f"the patch changed no layer: no pair of tokens is more similar than threshold={options['threshold']} "
                "in any layer of this input; lower the threshold."
            )
        return f"the patch changed no layer: r = {options.get('r')!r} merges no token in any layer; raise r."
    if method == "todo":
        factor = options.get("downsample_factor") or 2
        return f"the patch changed no block: downsample_factor={factor} keeps every key and value; use 2 or more."
    ratio = 0.5 if options.get("ratio") is None else options["ratio"]
    smallest = min(inputs) if inputs else None
    if not ratio or not smallest:
        return "the patch changed no block: ratio = 0 merges nothing; raise the ratio."
    return (
        f"the patch changed no block: ratio={ratio} is too small, int(ratio x tokens) = 0 in every patched block "
        f"(the smallest has {smallest} tokens, so it needs ratio >= 1/{smallest})."
    )


def _ids(row) -> list[int]:
    return [int(v) for v in (row.tolist() if hasattr(row, "tolist") else row)]


def _encoder_view(model: LabModel, work: bench.Workload, capture: dict, stats: dict) -> GroupView | None:
    import torch

    assignments = capture.get("assignments")
    if not assignments:
        return None
    n_input = int(stats.get("input_tokens") or _width(work))
    identity = torch.arange(n_input)
    rows = [identity if a is None else a[0].cpu() for a in assignments]
    labels = [f"after layer {i}" for i in range(len(rows))]
    per_sample = stats.get("output_tokens_per_sample")
    counts = [float(c) for c in per_sample] if per_sample is not None else None
    if model.kind == "vit":
        specials = int(capture.get("specials", 1))
        grid = work.extras.get("grid")
        if grid is not None and grid[0] * grid[1] != n_input - specials:
            grid = None
        groups = [_ids(row[specials:]) for row in rows]
        return GroupView(
            "image", labels, groups, grid, work.extras.get("image"), None, counts, [len(set(g)) for g in groups]
        )
    mask = work.inputs.get("attention_mask")
    real = mask[0].bool().cpu() if mask is not None else torch.ones(n_input, dtype=torch.bool)
    groups = [_ids(row[real]) for row in rows]
    return GroupView(
        "text", labels, groups, None, None, list(work.extras.get("tokens") or []), counts,
        [len(set(g)) for g in groups],
    )


def _diffusion_view(recorded: dict | None) -> GroupView | None:
    if recorded is None:
        return None
    groups = [_ids(recorded["groups"][0])]
    return GroupView(
        "diffusion", [recorded["name"]], groups, tuple(recorded["grid"]), None, None, None,
        [len(set(groups[0]))], block_index=recorded["index"],
    )


def _renumbered(work: Generator, offset: int, total: int, clock: float, prefix: str):
    """Re-yield ``work``'s progress as steps ``offset + done`` of ``total``; returns its value; closes it."""
    try:
        while True:
            try:
                step = next(work)
            except StopIteration as stop:
                return stop.value
            yield Progress(
                offset + step.done, total, elapsed_s=time.perf_counter() - clock, message=prefix + step.message
            )
    finally:
        work.close()


def iter_sweep(
    model: LabModel,
    work: bench.Workload,
    method: str,
    options: dict,
    name: str,
    values: list,
    *,
    runs: int = 3,
    warmup: int = 1,
    group_block: int | None = None,
    collect_garbage: bool = True,
) -> Generator[Progress, None, list[LabResult]]:
    """One :func:`iter_evaluate` per value of option ``name`` (the other options fixed); one result per value.

    Every setting is validated before the first forward, so a bad value fails the whole
    sweep at once. Progress counts the forwards of the whole sweep.
    """
    values = list(values)
    if not values:
        raise LabError(f"the sweep over {name!r} has no values.")
    settings = [{**options, name: value} for value in values]
    for setting in settings:
        _precheck(model, work, method, setting)
    per = bench.forward_count(runs, warmup)
    total, clock, results = per * len(settings), time.perf_counter(), []
    for index, (value, setting) in enumerate(zip(values, settings)):
        inner = iter_evaluate(
            model, work, method, setting, runs=runs, warmup=warmup, group_block=group_block,
            collect_garbage=collect_garbage,
        )
        prefix = f"{name}={value!r} ({index + 1}/{len(values)}): "
        results.append((yield from _renumbered(inner, index * per, total, clock, prefix)))
    return results


# --------------------------------------------------------------------------- python


def _literal(name: str, value) -> str:
    """``value`` as Python source that evaluates back to it (one sentence naming ``name`` otherwise)."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch scalars and arrays
        value = value.tolist()
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LabError(f"option {name}={value!r} is not a finite number; it has no Python line.")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a Python string literal
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_literal(name, v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    raise LabError(f"option {name}={value!r} is not a number, text, bool, list or pair; it has no Python line.")


def python_line(method: str, options: dict) -> str:
    """The setting as one line of Python: ``core.tokens.apply(model, method="tome", r=8)``.

    Options in the order given, as literals; the line expects ``core`` imported and the
    model in ``model``.
    """
    if not isinstance(method, str) or not method.isidentifier():
        raise LabError(f"method={method!r} is not a method name.")
    parts = [f"method={json.dumps(method)}"]
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier() or key in ("model", "method"):
            raise LabError(f"option name {key!r} cannot be a keyword argument of core.tokens.apply.")
        parts.append(f"{key}={_literal(key, value)}")
    return f"core.tokens.apply(model, {', '.join(parts)})"
