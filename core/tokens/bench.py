"""Measure what token merging does to one model: speed, memory, tokens, output fidelity.

The engine behind ``mergestudio tokens bench`` (and ``bench/bench_tokens.py``)::

    from core.tokens import bench, tiny
    work = bench.workload(tiny.build("vit").model, batch=8)
    result = bench.run(work, "tome", {"r": 13}, runs=5)
    print(bench.format_text(result))

How it measures (honest numbers, DESIGN.md):

* **Same process, same model, same inputs.** The merged model is the plain one patched
  with :func:`core.tokens.apply` and restored with ``handle.remove()``; after the runs the
  plain output is recomputed and compared with the first one (``restored_exactly``).
* **Warm.** ``warmup`` forwards of each variant are run and discarded first. The timed
  runs then *alternate* (plain, merged, plain, merged, ...) so that a noisy neighbour or
  a clock change hits both sides alike; the figures are **medians** of ``runs`` forwards.
  Each forward is timed alone (``torch.inference_mode``; on CUDA between two
  synchronisations).
* **Peak memory** of one more forward of each variant: on CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``) above what was allocated before; on the CPU the
  increase of the process's resident set (RSS, psutil) during the forward -- on Linux the
  kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) after
  ``malloc_trim``, elsewhere RSS sampled every millisecond. The CPU figure includes
  allocator slack, so compare the two variants, not the absolute value.
* **Tokens per layer** come from the handle's ``stats`` after a merged forward.
* **Fidelity** of the merged output against the plain one: for text encoders the cosine
  of the mean-pooled sentence embeddings (:func:`core.tokens.text.mean_pool`, weighting
  merged tokens by the real tokens they cover), for vision encoders the cosine of the
  pooled (CLS) output, for UNets the cosine of the noise prediction; always also the
  relative error ``||merged - plain|| / ||plain||`` of that quantity. Identical outputs
  give exactly 1 and 0.
* The torch thread count, device, dtype and attention implementation are reported.

Inputs are deterministic (seed 0): random images at the model's image size (ViTs fix it
through their position embeddings), the sentences of ``resources/prompts/sentences.txt``
for text encoders (the folder's tokenizer; a random model without one hashes words to
ids, and says so), random latents plus random text embeddings (77 tokens) for UNets.

Every error a user can cause is a :class:`~core.errors.MergeStudioError` with one
sentence; the API's own errors (unsupported model, bad option) pass through unchanged.
torch, transformers and diffusers are imported lazily.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

from core.errors import MergeStudioError, ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from core.jobs import Progress

SENTENCES_FILE = Path(__file__).resolve().parents[2] / "resources" / "prompts" / "sentences.txt"
UNET_TEXT_TOKENS = 77
DEFAULT_BATCH = {"vit": 8, "bert": 8, "unet": 2}
DEFAULT_UNET_RESOLUTION = 512

_VISION_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
)
_TEXT_CLASSES = ("BertModel", "BertForSequenceClassification")
_UNET_CLASSES = ("UNet2DConditionModel",)


class BenchError(MergeStudioError):
    """A benchmark cannot run as asked (bad option value, unusable input)."""


# --------------------------------------------------------------------------- loading


def model_kind(model) -> str | None:
    """``"vit"``, ``"bert"`` or ``"unet"`` for the classes the bench knows how to feed."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if names & set(_UNET_CLASSES):
        return "unet"
    if names & set(_VISION_CLASSES):
        return "vit"
    if names & set(_TEXT_CLASSES):
        return "bert"
    return None


@dataclass
class Loaded:
    """A model loaded for benchmarking."""

    model: Any
    kind: str | None
    description: str
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is not readable JSON ({' '.join(str(error).split())}).") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object.")
    return data


def _require_safetensors(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
        extra = f" (it has {pickles[0]}; pickle checkpoints are not loaded)" if pickles else ""
        raise ModelError(f"{folder} has no .safetensors weights{extra}; only safetensors are loaded.")


def check_folder(path) -> Path:
    """``path`` as a Path if it is an existing folder; else a :class:`ModelError` naming it (no torch needed)."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist.")
    if not folder.is_dir():
        raise ModelError(
            f"{folder} is not a folder; tokens bench takes a Hugging Face model folder or a diffusers "
            "UNet or pipeline folder."
        )
    return folder


def move(model, device: str, dtype):
    """``model`` on ``device`` in ``dtype``, without a call (or a library warning) when it is there already."""
    import logging

    import torch

    param = next(model.parameters(), None)
    if param is None:
        return model
    target = torch.device(device)
    same_device = param.device == target or (target.index is None and param.device.type == target.type)
    if same_device and param.dtype == dtype:
        return model
    # diffusers warns on stderr when a model is cast with .to(); the cast is what was asked.
    quiet = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return model.to(device=device, dtype=dtype)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def load(path, attn: str | None = None, dtype=None, device: str = "cpu") -> Loaded:
    """Load a local model folder for benchmarking.

    Accepted: a Hugging Face folder (``config.json`` with a ``model_type``: ViT, DeiT,
    BERT, a CLIP model -- its vision tower is loaded -- or anything else transformers'
    ``AutoModel`` loads, which :func:`core.tokens.apply` then accepts or refuses), a
    diffusers UNet folder (``config.json`` with ``_class_name``) or a diffusers pipeline
    folder (``model_index.json``; its ``unet/`` is loaded). Only safetensors weights.
    """
    import torch

    folder = check_folder(path)
    dtype = dtype or torch.float32
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        if "unet" not in index or not (folder / "unet" / "config.json").is_file():
            raise ModelError(
                f"{folder} is a diffusers pipeline without a unet/ folder ({index.get('_class_name', 'unknown')}); "
                "tokens bench needs a UNet."
            )
        return _load_unet(folder / "unet", dtype, device, f"UNet of the pipeline {folder.name}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json or model_index.json; it is not a model folder.")
    config = _read_json(config_path)
    if "_class_name" in config:
        name = config["_class_name"]
        if name not in _UNET_CLASSES:
            raise ModelError(
                f"{config_path} describes a diffusers {name}; tokens bench supports {', '.join(_UNET_CLASSES)}."
            )
        return _load_unet(folder, dtype, device, f"{name} {folder.name}")
    if "model_type" not in config:
        raise ModelError(f"{config_path} has no model_type; it is not a Hugging Face transformers model folder.")
    _require_safetensors(folder)
    try:
        import transformers
    except ImportError:  # pragma: no cover - a dependency
        raise ModelError("loading a Hugging Face model needs the transformers package.") from None
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model_type = config["model_type"]
    cls = transformers.CLIPVisionModel if model_type in ("clip", "clip_vision_model") else transformers.AutoModel
    from transformers.utils import logging as transformers_logging

    # stderr carries errors only: no progress bar, no warnings while loading.
    bar, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    except Exception as error:  # transformers' messages span lines: one line of it
        raise ModelError(f"could not load {folder}: {_short(error)}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()
    model = move(model, device, dtype).eval()
    loaded = Loaded(model, model_kind(model), f"{type(model).__name__} from {folder}")
    if model_type == "clip":
        loaded.notes.append("CLIP folder: its vision tower (CLIPVisionModel) is benchmarked.")
    if loaded.kind == "bert":
        loaded.tokenizer = _tokenizer(folder, loaded.notes)
    return loaded


def _tokenizer(folder: Path, notes: list[str]):
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any((folder / n).is_file() for n in names):
        notes.append(f"{folder} has no tokenizer: the sentences' words are hashed to token ids.")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:
        raise ModelError(f"could not load the tokenizer of {folder}: {_short(error)}") from None


def _load_unet(folder: Path, dtype, device: str, description: str) -> Loaded:
    _require_safetensors(folder)
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise ModelError(f"{folder} is a diffusers model; loading it needs the diffusers package (not installed).")
    try:
        model = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    except Exception as error:
        raise ModelError(f"could not load {folder}: {_short(error)}") from None
    return Loaded(move(model, device, dtype).eval(), "unet", description)


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_kind(loaded: Loaded, method: str, options: dict) -> str:
    """The model's kind; for a model the bench cannot feed, the API's own refusal (one line).

    A class the bench does not know is first handed to :func:`core.tokens.apply`, so the
    user reads the API's message (which classes are supported); should the API accept
    it, the bench says it cannot build inputs for it.
    """
    if loaded.kind is not None:
        return loaded.kind
    from core import tokens

    handle = tokens.apply(loaded.model, method=method, **options)
    handle.remove()
    raise BenchError(
        f"token merging accepts a {type(loaded.model).__name__}, but tokens bench does not know how to build inputs "
        "for it; benchmark it from Python with core.tokens.bench.run()."
    )


# --------------------------------------------------------------------------- inputs


def read_sentences(path: Path | None = None) -> list[str]:
    """The sample sentences (one per line, ``#`` comments and blank lines skipped)."""
    path = Path(path) if path is not None else SENTENCES_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BenchError(f"cannot read the sample sentences {path}: {error.strerror or error}.") from None
    sentences = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not sentences:
        raise BenchError(f"{path} has no sentences.")
    return sentences


def hash_words(text: str) -> list[str]:
    """The words and punctuation :func:`hash_tokenize` hashes, lower-cased, in order."""
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def hash_tokens(text: str, max_length: int) -> list[str]:
    """The token strings of ``text`` under :func:`hash_tokenize`: ``[CLS]``, its words (truncated), ``[SEP]``."""
    return ["[CLS]", *hash_words(text)[: max(max_length - 2, 0)], "[SEP]"]


def hash_tokenize(sentences: list[str], vocab_size: int, max_length: int):
    """Words and punctuation hashed to ids (for a random BERT without a tokenizer).

    ``[CLS] words... [SEP]``, right-padded with 0; returns ``input_ids`` and
    ``attention_mask`` as ``[B, N]`` int64 tensors. Deterministic (crc32, not ``hash``).
    """
    import torch

    cls_id, sep_id = (101, 102) if vocab_size > 1000 else (1, 2)
    first = sep_id + 1
    rows = []
    for text in sentences:
        words = hash_words(text)
        ids = [first + zlib.crc32(w.encode()) % (vocab_size - first) for w in words]
        rows.append([cls_id, *ids[: max(max_length - 2, 0)], sep_id])
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class Workload:
    """A model with fixed inputs: what :func:`run` times.

    ``forward()`` runs the model once on the inputs; ``readout(output, handle)`` is the
    quantity whose fidelity is measured (a ``[B, D]`` tensor). ``extras`` holds what a
    caller wants to keep about the inputs (the picture, the token strings); the
    measurement never reads it.
    """

    model: Any
    kind: str
    inputs: dict
    batch: int
    description: str
    input_text: str
    resolution: int | None = None
    tokens: int | None = None
    fidelity_metric: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    attention: str | None = None
    parameters: int = 0
    extras: dict = field(default_factory=dict)  # what made the inputs, for display (core.tokens.lab)

    def forward(self):
        if self.kind == "unet":
            # Positionally, as diffusers pipelines call it (tomesd's hook reads args[0]).
            rest = {k: v for k, v in self.inputs.items() if k not in ("sample", "timestep")}
            return self.model(self.inputs["sample"], self.inputs["timestep"], **rest).sample
        return self.model(**self.inputs)

    def readout(self, output, handle=None):
        import torch

        if self.kind == "unet":
            return output.flatten(1)
        if self.kind == "bert":
            from core.tokens.text import mean_pool

            mask = self.inputs.get("attention_mask")
            hidden = output.last_hidden_state
            # mean_pool weights merged tokens through the handle of the forward that made them
            # (in threshold mode a merged batch can keep its width, so never judge by the shape).
            if handle is not None and hasattr(handle, "assignment"):
                return mean_pool(hidden, handle, mask)
            return mean_pool(hidden, None, mask)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            pooled = getattr(output, "image_embeds", None)
        if pooled is None:
            pooled = output.last_hidden_state[:, 0]
        return torch.as_tensor(pooled).flatten(1)


def _parameters(model) -> int:
    try:
        return sum(p.numel() for p in model.parameters())
    except Exception:  # pragma: no cover - not a torch module
        return 0


def _attention(model) -> str | None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is None and config is not None and hasattr(config, "vision_config"):
        impl = getattr(config.vision_config, "_attn_implementation", None)
    return impl


def workload(
    model,
    kind: str | None = None,
    batch: int | None = None,
    resolution: int | None = None,
    tokenizer=None,
    sentences: list[str] | None = None,
    seed: int = 0,
    notes: list[str] | None = None,
    description: str | None = None,
) -> Workload:
    """Deterministic inputs for ``model`` (see the module docstring); ``kind`` is inferred if None."""
    import torch

    kind = kind or model_kind(model)
    if kind is None:
        raise BenchError(f"tokens bench does not know how to build inputs for a {type(model).__name__}.")
    if batch is None:
        batch = DEFAULT_BATCH[kind]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BenchError(f"--batch {batch!r} must be a whole number of at least 1.")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise BenchError(f"--resolution {resolution!r} must be a positive whole number of pixels.")
    notes = list(notes or [])
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    work = dict(model=model, kind=kind, batch=batch, notes=notes, device=str(device))
    work["dtype"] = str(dtype).replace("torch.", "")
    work["parameters"] = _parameters(model)
    work["description"] = description or type(model).__name__

    if kind == "vit":
        vision = getattr(config, "vision_config", config)
        size = vision.image_size
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        patch = vision.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        channels = getattr(vision, "num_channels", 3)
        if resolution is not None and resolution != size:
            notes.append(
                f"--resolution {resolution} ignored: this {type(model).__name__} fixes its image size at {size} px "
                "(position embeddings)."
            )
        pixels = torch.randn(batch, channels, size, size, generator=generator).to(device=device, dtype=dtype)
        specials = 2 if getattr(vision, "model_type", None) == "deit" else 1  # DeiT: class + distillation token
        tokens = (size // patch) ** 2 + specials
        return Workload(
            **work,
            inputs={"pixel_values": pixels},
            input_text=f"{batch} random image(s) of {size}x{size} px ({tokens} tokens; the model's image size)",
            resolution=size,
            tokens=tokens,
            fidelity_metric="pooled output (CLS)",
            attention=_attention(model),
        )

    if kind == "bert":
        if resolution is not None:
            notes.append(f"--resolution {resolution} ignored: the model reads text.")
        sentences = sentences if sentences is not None else read_sentences()
        chosen = [sentences[i % len(sentences)] for i in range(batch)]
        max_length = int(getattr(config, "max_position_embeddings", 512))
        if tokenizer is not None:
            encoded = tokenizer(chosen, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        else:
            inputs = hash_tokenize(chosen, int(config.vocab_size), max_length)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        lengths = inputs["attention_mask"].sum(1).tolist()
        shown = f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else f"{lengths[0]}"
        return Workload(
            **work,
            inputs=inputs,
            input_text=f"{batch} sample sentence(s) of {shown} tokens (padded to {inputs['input_ids'].shape[1]})",
            tokens=int(inputs["input_ids"].shape[1]),
            fidelity_metric="mean-pooled embedding",
            attention=_attention(model),
        )

    # UNet: random latents at resolution / 8 plus random text embeddings.
    resolution = resolution or DEFAULT_UNET_RESOLUTION
    if resolution % 8:
        raise BenchError(f"--resolution {resolution} must be a multiple of 8 for a UNet (the VAE downsamples by 8).")
    side = resolution // 8
    channels = int(config.in_channels)
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else int(cross)
    latents = torch.randn(batch, channels, side, side, generator=generator).to(device=device, dtype=dtype)
    text = torch.randn(batch, UNET_TEXT_TOKENS, cross, generator=generator).to(device=device, dtype=dtype)
    inputs = {"sample": latents, "timestep": torch.tensor(500, device=device), "encoder_hidden_states": text}
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL-style extra conditioning
        pooled = int(getattr(config, "projection_class_embeddings_input_dim", 2816)) - 6 * int(
            getattr(config, "addition_time_embed_dim", 256)
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(device=device, dtype=dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch).to(
                device=device, dtype=dtype
            ),
        }
    return Workload(
        **work,
        inputs=inputs,
        input_text=(
            f"{batch} random latent(s) of {resolution}x{resolution} px ({side}x{side}, {side * side} tokens at full "
            f"resolution) with random text embeddings ({UNET_TEXT_TOKENS} tokens), timestep 500"
        ),
        resolution=resolution,
        tokens=side * side,
        fidelity_metric="noise prediction",
    )


# --------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(work: Workload) -> tuple[float, Any]:
    _sync(work.device)
    start = time.perf_counter()
    out = work.forward()
    _sync(work.device)
    return time.perf_counter() - start, out


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(work: Workload, fn: Callable[[], Any], collect: bool = True) -> tuple[int | None, str, Any]:
    """Run ``fn`` once; return (peak bytes above the start, how it was measured, fn's result).

    ``collect=False`` skips the garbage collection before the measurement: a GUI runs
    this in a worker thread, and collecting there could destroy Qt objects (which must
    die on the GUI thread); the app collects on its GUI thread instead.
    """
    if collect:
        gc.collect()
    if work.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated", out
    _malloc_trim()
    import psutil

    process = psutil.Process()
    base = process.memory_info().rss
    if _reset_high_water_mark() and _proc_status("VmHWM") is not None:
        out = fn()
        peak = _proc_status("VmHWM") or base
        return max(peak - base, 0), "RSS high-water mark (VmHWM)", out
    # Elsewhere: sample RSS from a thread while fn runs.
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return max(peak[0] - base, 0), "RSS sampled every 1 ms (psutil)", out


def compare(plain, merged) -> dict:
    """Cosine (mean and min over the batch) and relative error of ``merged`` against ``plain`` ([B, D])."""
    import torch

    if plain.shape != merged.shape:
        raise BenchError(
            f"the merged output has shape {list(merged.shape)}, the plain one {list(plain.shape)}; cannot compare."
        )
    if torch.equal(plain, merged):
        return {"cosine": 1.0, "cosine_min": 1.0, "relative_error": 0.0}
    a, b = plain.double().flatten(1), merged.double().flatten(1)
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=1)
    error = (b - a).norm() / a.norm().clamp_min(1e-30)
    return {
        "cosine": float(cosines.mean()),
        "cosine_min": float(cosines.min()),
        "relative_error": float(error),
    }


def _jsonable(value):
    """Stats as plain JSON: tensors to lists, tuples to lists, non-finite floats to None."""
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _apply(work: Workload, method: str, options: dict):
    from core import tokens

    return tokens.apply(work.model, method=method, **options)


def run(work: Workload, method: str, options: dict, runs: int = 5, warmup: int = 1) -> dict:
    """Benchmark ``method`` with ``options`` on ``work``; returns the result dict (JSON-ready).

    Keys: the workload (``model``, ``kind``, ``batch``, ``input``, ``resolution``,
    ``device``, ``dtype``, ``attention``, ``parameters``, ``threads``), ``method``,
    ``options`` (``options_text`` as the user gave them), ``runs``, ``warmup``,
    ``time_plain_s`` / ``time_merged_s`` (medians),
    ``times_plain_s`` / ``times_merged_s`` (every run), ``speedup``,
    ``throughput_plain`` / ``throughput_merged`` (samples per second),
    ``peak_memory_plain_bytes`` / ``peak_memory_merged_bytes``, ``memory_measure``,
    ``tokens_per_layer``, ``input_tokens``, ``output_tokens``, ``merge_seconds``,
    ``stats`` (the handle's, as JSON), ``fidelity_metric``, ``cosine``, ``cosine_min``,
    ``relative_error``, ``restored_exactly``, ``speedup_best`` (fastest run against
    fastest run), ``spread`` (slowest / fastest run, the worse side), ``notes``.

    The same measurement one forward at a time: :func:`iter_run`.
    """
    from core.jobs import drive

    return drive(iter_run(work, method, options, runs=runs, warmup=warmup))


def forward_count(runs: int, warmup: int) -> int:
    """How many forwards :func:`iter_run` makes (the ``total`` of its progress)."""
    return 2 * warmup + 2 * runs + 2


def iter_run(
    work: Workload,
    method: str,
    options: dict,
    runs: int = 5,
    warmup: int = 1,
    *,
    on_apply: Callable[[Any], None] | None = None,
    on_merged: Callable[[Any, Any], None] | None = None,
    collect_garbage: bool = True,
) -> Generator[Progress, None, dict]:
    """:func:`run` as a generator: yields a :class:`~core.jobs.Progress` after every forward, returns run's dict.

    The options are validated (one apply and remove, no forward) before the first
    forward. ``on_apply(handle)`` is called after every apply, before the patched
    forwards (e.g. to choose what the handle records); ``on_merged(handle, output)``
    once, right after the first timed merged forward, while the patch is still in
    place (to read what the handle kept about that forward). Each forward runs under
    ``torch.inference_mode`` on its own, so the generator may be resumed from another
    thread between yields. Closing the generator (a cancelled job) removes any patch:
    the model is exactly as before.
    """
    import torch

    from core.jobs import Progress

    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"--{name} {value!r} must be a whole number of at least {low}.")
    options = dict(options)
    total = forward_count(runs, warmup)
    clock = time.perf_counter()
    steps = [0]
    patch: list = []

    def step(message: str) -> Progress:
        steps[0] += 1
        return Progress(steps[0], total, elapsed_s=time.perf_counter() - clock, message=message)

    def enter():
        handle = _apply(work, method, options)
        patch.append(handle)
        if on_apply is not None:
            on_apply(handle)
        return handle

    def leave() -> None:
        while patch:
            patch.pop().remove()

    try:
        # The options are validated (and a bad one reported) before any time is spent.
        with torch.inference_mode():
            enter()
        leave()

        for index in range(warmup):
            with torch.inference_mode():
                work.forward()
            yield step(f"warm-up forward {index + 1}/{warmup} without merging")
        with torch.inference_mode():
            plain_time, plain_out = _timed(work)
            plain = work.readout(plain_out)
        del plain_out
        times_plain = [plain_time]
        yield step(f"timed forward 1/{runs} without merging")

        with torch.inference_mode():
            enter()
        for index in range(warmup):
            with torch.inference_mode():
                work.forward()
            yield step(f"warm-up forward {index + 1}/{warmup} with {method}")
        with torch.inference_mode():
            handle = patch[-1]
            merged_time, merged_out = _timed(work)
            merged = work.readout(merged_out, handle)
            stats = _jsonable(getattr(handle, "stats", {}) or {})
            if on_merged is not None:
                on_merged(handle, merged_out)
            del merged_out, handle
        leave()
        times_merged = [merged_time]
        yield step(f"timed forward 1/{runs} with {method}")

        # The timed runs alternate so drift hits both sides alike. The forwards above
        # were already warm, so they count as the first pair.
        for index in range(1, runs):
            with torch.inference_mode():
                times_plain.append(_timed(work)[0])
            yield step(f"timed forward {index + 1}/{runs} without merging")
            with torch.inference_mode():
                enter()
                times_merged.append(_timed(work)[0])
            leave()
            yield step(f"timed forward {index + 1}/{runs} with {method}")

        with torch.inference_mode():
            memory_plain, how, again = peak_memory(work, work.forward, collect_garbage)
            restored = bool(torch.equal(work.readout(again), plain))
            del again
        yield step("peak memory without merging")
        with torch.inference_mode():
            enter()
            memory_merged, _, out = peak_memory(work, work.forward, collect_garbage)
            del out
        leave()
        yield step(f"peak memory with {method}")
    finally:
        leave()

    fidelity = compare(plain, merged)
    median_plain = statistics.median(times_plain)
    median_merged = statistics.median(times_merged)
    result = {
        "model": work.description,
        "class": type(work.model).__name__,
        "kind": work.kind,
        "parameters": work.parameters,
        "device": work.device,
        "dtype": work.dtype,
        "attention": work.attention,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": work.batch,
        "resolution": work.resolution,
        "input": work.input_text,
        "method": method,
        "options": _jsonable(options),
        "options_text": ", ".join(f"{k}={v}" for k, v in options.items()),
        "runs": runs,
        "warmup": warmup,
        "time_plain_s": median_plain,
        "time_merged_s": median_merged,
        "times_plain_s": times_plain,
        "times_merged_s": times_merged,
        "speedup": median_plain / median_merged if median_merged > 0 else None,
        "throughput_plain": work.batch / median_plain if median_plain > 0 else None,
        "throughput_merged": work.batch / median_merged if median_merged > 0 else None,
        "peak_memory_plain_bytes": memory_plain,
        "peak_memory_merged_bytes": memory_merged,
        "memory_measure": how,
        "tokens_per_layer": stats.get("tokens_per_layer"),
        "input_tokens": stats.get("input_tokens", work.tokens),
        "output_tokens": stats.get("output_tokens"),
        "merge_seconds": stats.get("merge_seconds"),
        "stats": stats,
        "fidelity_metric": work.fidelity_metric,
        **fidelity,
        "restored_exactly": restored,
        "notes": list(work.notes),
    }
    # The fastest runs are the least disturbed by other load; a wide spread says the medians are noisy.
    result["speedup_best"] = min(times_plain) / min(times_merged) if min(times_merged) > 0 else None
    result["spread"] = max(max(t) / min(t) for t in (times_plain, times_merged) if min(t) > 0)
    if runs >= 3 and result["spread"] > 1.3:
        result["notes"].append(
            f"run times vary by up to {result['spread']:.1f}x (other load on the machine?): the medians are noisy; "
            f"fastest run against fastest run the speed-up is {result['speedup_best']:.2f}x."
        )
    if not restored:
        result["notes"].append("after remove() the plain output differed from the first plain run.")
    return result


def time_variants(work: Workload, variants: dict, runs: int = 5, warmup: int = 1) -> dict:
    """Time several ways of running ``work`` against each other, alternating, medians.

    ``variants`` maps a name to ``(enter, leave)``: ``enter()`` patches the model (and may
    return a handle), ``leave(handle)`` undoes it; ``(None, None)`` is the plain model.
    Each round runs every variant once, in order, so drift hits all alike. Returns
    ``{name: {"time_s": median, "times_s": [...], "output": readout of the last forward,
    "stats": handle stats or {}}}``.
    """
    import torch

    out: dict[str, dict] = {name: {"times_s": []} for name in variants}

    def once(name: str, timed: bool) -> None:
        enter, leave = variants[name]
        handle = enter() if enter is not None else None
        try:
            seconds, output = _timed(work)
            if timed:
                out[name]["times_s"].append(seconds)
            out[name]["output"] = work.readout(output, handle)
            out[name]["stats"] = _jsonable(getattr(handle, "stats", {}) or {}) if handle is not None else {}
        finally:
            if leave is not None:
                leave(handle)

    with torch.inference_mode():
        for name in variants:
            for _ in range(warmup):
                once(name, timed=False)
        for _ in range(runs):
            for name in variants:
                once(name, timed=True)
    for entry in out.values():
        entry["time_s"] = statistics.median(entry["times_s"])
    return out


# --------------------------------------------------------------------------- printing


def _mb(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e6:+.0f} MB"


def _count(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def format_tokens(tokens, output=None, limit: int = 14) -> str:
    """``[197, 184, ...]`` as ``197 184 ... 54 -> 41 out`` (the middle elided past ``limit``)."""
    if isinstance(tokens, dict):
        return ", ".join(f"{k}: {format_tokens(v)}" for k, v in tokens.items())
    if not isinstance(tokens, list) or not tokens:
        return "n/a" if tokens in (None, []) else str(tokens)
    shown = [_count(t) if not isinstance(t, list) else "[" + " ".join(_count(x) for x in t) + "]" for t in tokens]
    if len(shown) > limit:
        shown = shown[: limit // 2] + ["..."] + shown[-(limit // 2) :]
    text = " ".join(shown)
    if output is not None:
        text += f" -> {_count(output)} out"
    return text


def _tokens_line(result: dict) -> str:
    stats = result.get("stats") or {}
    inputs = stats.get("input_tokens_per_layer")
    if not isinstance(inputs, list) or not isinstance(stats.get("tokens_per_layer"), list):
        return f"Tokens per layer: {format_tokens(result['tokens_per_layer'], result.get('output_tokens'))}"
    # A UNet: the blocks keep every token outside their merged branches; show merged of input per block call.
    kv = stats.get("kv_tokens_per_layer")
    rows = list(zip(stats["tokens_per_layer"], inputs, kv if isinstance(kv, list) else [None] * len(inputs)))
    groups: list[list] = []
    for row in rows:
        if groups and groups[-1][0] == row:
            groups[-1][1] += 1
        else:
            groups.append([row, 1])
    parts = []
    for (merged, total, keys), count in groups:
        text = f"{merged} of {total}" if keys is None else f"{merged} queries and {keys} keys/values of {total}"
        parts.append(f"{count} x {text}" if count > 1 else text)
    blocks = stats.get("patched_blocks")
    where = f" ({blocks} patched blocks)" if blocks is not None else ""
    return f"Tokens per block call{where}: " + ", ".join(parts)


def format_text(result: dict) -> str:
    """The human-readable report of one :func:`run`."""
    options = result.get("options_text") or ", ".join(f"{k}={v}" for k, v in result["options"].items())
    options = options or "defaults"
    params = result.get("parameters") or 0
    params = f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params / 1e3:.1f}k"
    attention = f", {result['attention']} attention" if result.get("attention") else ""
    lines = [
        f"Model:    {result['model']} ({result['class']}, {params} parameters)",
        f"Device:   {result['device']}, {result['dtype']}, {result['threads']} torch thread(s){attention}, "
        f"torch {result['torch']}",
        f"Input:    {result['input']}",
        f"Method:   {result['method']} ({options})",
        f"Runs:     {result['warmup']} warm-up + {result['runs']} timed forward(s) each way, alternating; medians",
        "",
        f"                   {'time/forward':>13} {'per second':>11} {'peak memory':>12}",
    ]
    for label, key in (("without merging", "plain"), ("with merging", "merged")):
        seconds = result[f"time_{key}_s"]
        rate = result[f"throughput_{key}"]
        lines.append(
            f"  {label:<16} {seconds * 1000:>10.1f} ms {rate:>11.2f} {_mb(result[f'peak_memory_{key}_bytes']):>12}"
        )
    lines += [
        "",
        f"Speed-up: {result['speedup']:.2f}x (medians; fastest runs {result['speedup_best']:.2f}x); "
        f"memory: {result['memory_measure']}",
        _tokens_line(result),
    ]
    if result.get("merge_seconds") is not None:
        lines.append(f"Time spent merging (last forward): {result['merge_seconds'] * 1000:.1f} ms")
    lines.append(
        f"Fidelity: cosine of the {result['fidelity_metric']} {result['cosine']:.4f} (min {result['cosine_min']:.4f}), "
        f"relative error {result['relative_error']:.4f}"
    )
    lines.append(f"Restored exactly after remove(): {'yes' if result['restored_exactly'] else 'NO'}")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines)


__all__ = [
    "BenchError",
    "Loaded",
    "Workload",
    "compare",
    "format_text",
    "format_tokens",
    "forward_count",
    "hash_tokenize",
    "iter_run",
    "load",
    "model_kind",
    "peak_memory",
    "read_sentences",
    "run",
    "time_variants",
    "workload",
]
