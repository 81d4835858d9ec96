"""The same prompt and seed through 2-4 diffusers pipelines, step by step and timed.

Each pane loads its pipeline folder (``DiffusionPipeline.from_pretrained``, safetensors
only, the stored scheduler config, no safety checker), optionally patches its UNet
with token merging (``core.tokens.apply(pipe, method="tomesd" | "todo", ...)``,
:mod:`core.tokens.diffusion`), generates with ``torch.Generator(device).manual_seed(seed)``,
removes the patch and frees the pipeline before the next pane. The same pipeline as two
panes, one with ``token_merging`` and one without, is the "token merging on/off"
comparison.

How the steps reach the caller: the pipeline runs in a worker thread and its
``callback_on_step_end`` hands each step to :func:`iter_compare_images` through a
queue, then waits until the consumer has taken the event (lock-step, so the pipeline
never runs ahead of what the GUI has seen and Stop acts at the very next step). Stop
sets ``pipe._interrupt = True`` from that callback: diffusers skips the remaining steps
and still decodes the latents, so a stopped pane carries the *partial* image -- the
decode of the latents after the last step that ran -- with status "stopped".

Timings exclude the time the worker waits for the consumer. ``seconds`` is the
pipeline call (prompt encoding, the steps and the VAE decode); ``seconds_per_step`` is
the time from the start of the call to the end of the last step run, divided by the
steps run (prompt encoding is spread over the steps).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional, Union

from core.errors import MergeStudioError
from core.generate.text import (
    MAX_PANES,
    MIN_PANES,
    NO_MEMORY,
    MemoryMonitor,
    PaneFinished,
    PaneStarted,
    _integer,
    _known_fields,
    _number,
    _reason,
    free_memory,
)
from core.jobs import CancelToken, drive

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

_NOT_CHECKED = ("safety_checker",)  # passed as None: a missing folder does not matter


@dataclass
class ImageSettings:
    """What every pane generates from."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    height: int = 512
    width: int = 512
    guidance_scale: float = 7.5

    def validate(self) -> None:
        """Raise MergeStudioError naming the first field out of range."""
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise MergeStudioError(f"{name}: expected text, got {type(getattr(self, name)).__name__}.")
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("steps", self.steps, 1, None)
        for name in ("height", "width"):
            value = getattr(self, name)
            _integer(name, value, 8, None)
            if value % 8:
                raise MergeStudioError(
                    f"{name}: must be a multiple of 8 (the VAE works on 8 x 8 pixel cells), got {value}."
                )
        _number("guidance_scale", self.guidance_scale, lambda v: v >= 0, "a finite number >= 0")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ImageSettings":
        return cls(**_known_fields(cls, d, "image settings"))


@dataclass
class ImageSource:
    """One pane: a diffusers pipeline folder, optionally with token merging on its UNet."""

    label: str
    pipeline: str
    token_merging: Optional[dict] = None  # e.g. {"method": "tomesd", "ratio": 0.5}; see core.tokens.diffusion.apply

    # tomesd (Bolya & Hoffman 2023, https://arxiv.org/abs/2303.17604) draws its partitions with
    # use_rand=True by default, which needs the even [uncond, cond] batch of classifier-free guidance
    # (guidance_scale > 1); without guidance pass "use_rand": False, or the pane fails saying so.


@dataclass
class PaneStep:
    """Step ``step`` of ``total`` (1-based) of a pane has finished."""

    pane: int
    step: int
    total: int


@dataclass
class ImageResult:
    """What one pane produced, with its numbers (timings: see the module docstring)."""

    pane: int
    label: str
    pipeline: str
    image: Optional["PIL.Image.Image"]  # the partial image when stopped (None if no step ran), None when failed
    seconds: Optional[float]
    seconds_per_step: Optional[float]
    peak_memory_bytes: Optional[int]
    memory_kind: str
    status: str  # "done" | "stopped" | "failed"
    error: Optional[str]
    steps_done: int
    token_merging: Optional[dict]
    total_steps: Optional[int] = None
    load_s: Optional[float] = None
    token_stats: Optional[dict] = None  # the token-merging handle's stats after the last UNet call
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """Everything but the image's pixels (its size instead)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}
        out = json.loads(json.dumps(out, default=_jsonable))  # tuples -> lists, a plain copy
        out["image_size"] = list(self.image.size) if self.image is not None else None
        return out

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write the image as ``pane<N>-<label>.png`` in ``folder`` (atomically); return its path."""
        if self.image is None:
            raise MergeStudioError(f"Pane {self.pane} ('{self.label}'): has no image to save (status {self.status}).")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.label).strip("-") or "pane"
        target = folder / f"pane{self.pane}-{slug}.png"
        tmp = folder / f".{target.name}.{os.getpid()}.tmp"
        try:
            self.image.save(tmp, format="PNG")
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise MergeStudioError(f"{target}: cannot be written ({exc.strerror or exc}).") from None
        return target


ImageEvent = Union[PaneStarted, PaneStep, PaneFinished]


# ----------------------------------------------------------------------------- difference image


def difference_image(
    a: "PIL.Image.Image", b: "PIL.Image.Image", *, gain: float = 4.0
) -> tuple["PIL.Image.Image", dict]:
    """``|a - b| * gain`` per RGB channel (clipped to 255) and stats of the unamplified difference.

    Stats are on the 0-255 scale: ``mean_abs``, ``max_abs`` and ``psnr`` (dB,
    ``10 log10(255^2 / MSE)``; ``inf`` for identical images).
    """
    import numpy as np
    from PIL import Image

    _number("gain", gain, lambda v: v > 0, "a finite number > 0")
    if a.size != b.size:
        raise MergeStudioError(
            f"difference_image: the images differ in size ({a.size[0]}x{a.size[1]} and {b.size[0]}x{b.size[1]})."
        )
    x = np.asarray(a.convert("RGB"), dtype=np.float64)  # [H, W, 3]
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    diff = np.abs(x - y)
    mse = float(np.mean(diff**2))
    stats = {
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
        "psnr": math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse),
    }
    shown = np.clip(diff * gain, 0, 255).round().astype(np.uint8)
    return Image.fromarray(shown, mode="RGB"), stats


# ----------------------------------------------------------------------------- loading


def check_pipeline_folder(folder: Path) -> dict:
    """model_index.json of ``folder``; MergeStudioError naming a missing component folder."""
    if not folder.is_dir():
        raise MergeStudioError(f"{folder}: no such pipeline folder.")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise MergeStudioError(f"{folder}: not a diffusers pipeline (no model_index.json).")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeStudioError(f"{index_file}: cannot be read as JSON ({_reason(exc)}).") from None
    if not isinstance(index, dict):
        raise MergeStudioError(f"{index_file}: is not a JSON object.")
    for name, value in index.items():
        if name.startswith("_") or name in _NOT_CHECKED:
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] and value[1]:
            if not (folder / name).is_dir():
                raise MergeStudioError(
                    f"{folder}: the pipeline has no '{name}/' folder, which model_index.json lists ({value[1]})."
                )
    return index


def load_pipeline(folder: Path, device: str):
    """The pipeline on ``device`` (safetensors only, stored scheduler, no safety checker)."""
    from diffusers import DiffusionPipeline

    index = check_pipeline_folder(folder)
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra["safety_checker"] = None
    if "requires_safety_checker" in index:
        extra["requires_safety_checker"] = False
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, **extra)
    except (MemoryError, MergeStudioError):
        raise
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise MergeStudioError(f"{folder}: cannot be loaded as a diffusers pipeline ({_reason(exc)}).") from None
    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        raise MergeStudioError(f"{folder}: {type(pipe).__name__} reports no steps (it has no callback_on_step_end).")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------- one pane on a loaded pipeline


def iter_image_pane(
    pipe,
    settings: ImageSettings,
    *,
    pane: int = 0,
    label: str = "",
    pipeline: str = "",
    token_merging: Optional[dict] = None,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
) -> Generator[PaneStep, None, ImageResult]:
    """Generate on an already loaded ``pipe``, yielding PaneStep per step; return the ImageResult.

    With ``token_merging`` the UNet is patched for this call only (removed in every
    case). Errors inside (token-merging options, out of memory, the pipeline failing)
    end the pane "failed"; closing the generator stops the pipeline and waits for it.
    ``cancel`` already set ends the pane "stopped" before the pipeline runs (no image).
    """
    import torch

    cancel = cancel or CancelToken()
    result = ImageResult(
        pane=pane, label=label, pipeline=pipeline, image=None, seconds=None, seconds_per_step=None,
        peak_memory_bytes=None, memory_kind=NO_MEMORY, status="failed", error=None, steps_done=0,
        token_merging=dict(token_merging) if token_merging is not None else None,
    )
    handle = None
    phase = "applying token merging"
    if cancel.cancelled:  # Stop was pressed while the pipeline loaded: not one step, no decode
        result.status = "stopped"
        result.notes.append("Stopped while the pipeline loaded; nothing was generated.")
        return result
    try:
        if token_merging is not None:
            handle = _apply_token_merging(pipe, token_merging, pipeline)
        result.notes.extend(_prompt_notes(pipe, settings))
        phase = "generating"
        runner = _Runner(pipe, settings, torch.Generator(device=device).manual_seed(settings.seed))
        runner.start()
        try:
            while True:
                kind, payload = runner.events.get()
                if kind == "step":
                    step, total = payload
                    result.steps_done, result.total_steps = step, total
                    yield PaneStep(pane, step, total)
                    if cancel.cancelled:
                        runner.stop.set()
                    runner.gate.set()
                elif kind == "done":
                    result.image = payload
                    break
                else:
                    raise payload
        finally:
            runner.finish()
        result.seconds = runner.seconds
        if result.steps_done and runner.last_step_s is not None:
            result.seconds_per_step = runner.last_step_s / result.steps_done
        # Stop after the last step changes nothing: the image is complete.
        cut = result.total_steps is not None and result.steps_done < result.total_steps
        result.status = "stopped" if runner.stop.is_set() and cut else "done"
        if handle is not None:
            result.token_stats = json.loads(json.dumps(handle.stats, default=_jsonable))
    except MergeStudioError as exc:
        message = str(exc)
        if pipeline and pipeline not in message:
            message = f"{pipeline}: {message}"  # e.g. a token-merging option: say which pane's pipeline
        result.status, result.error, result.image = "failed", message, None
    except Exception as exc:  # noqa: BLE001 - a failed pane, said in one sentence
        result.status, result.image = "failed", None
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            result.error = f"{pipeline or 'The pipeline'}: ran out of memory while {phase} on {device}."
        else:
            result.error = f"{pipeline or 'The pipeline'}: failed while {phase} ({_reason(exc)})."
    finally:
        if handle is not None:
            handle.remove()
    return result


def _apply_token_merging(pipe, options: dict, where: str):
    from core.tokens import apply

    if not isinstance(options, dict) or not isinstance(options.get("method"), str):
        raise MergeStudioError(f"{where}: token_merging needs a 'method' ('tomesd' or 'todo'), got {options!r}.")
    opts = dict(options)
    method = opts.pop("method")
    return apply(pipe, method=method, **opts)


def _prompt_notes(pipe, settings: ImageSettings) -> list[str]:
    """Say when a prompt is longer than the text encoder reads (diffusers truncates it)."""
    tok = getattr(pipe, "tokenizer", None)
    limit = getattr(tok, "model_max_length", None)
    if tok is None or not isinstance(limit, int) or limit > 100_000:
        return []
    notes = []
    for name in ("prompt", "negative_prompt"):
        n = len(tok(getattr(settings, name))["input_ids"])
        if n > limit:
            notes.append(f"The {name.replace('_', ' ')} is {n} tokens; the text encoder reads the first {limit}.")
    return notes


class _Runner:
    """The pipeline call in a worker thread, in lock-step with the consumer through ``gate``."""

    def __init__(self, pipe, settings: ImageSettings, generator) -> None:
        self.pipe = pipe
        self.settings = settings
        self.generator = generator
        self.events: queue.Queue = queue.Queue()
        self.gate = threading.Event()  # set by the consumer: the step was seen, go on
        self.stop = threading.Event()
        self.seconds: Optional[float] = None
        self.last_step_s: Optional[float] = None
        self._waited = 0.0
        self._thread = threading.Thread(target=self._run, name="image-pane", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _on_step(self, pipe, i: int, t, tensors: dict) -> dict:
        self.last_step_s = time.perf_counter() - self._start - self._waited
        total = getattr(pipe, "_num_timesteps", None) or self.settings.steps
        waited = time.perf_counter()
        self.events.put(("step", (i + 1, int(total))))
        self.gate.wait()
        self.gate.clear()
        self._waited += time.perf_counter() - waited
        if self.stop.is_set():
            pipe._interrupt = True  # diffusers skips the remaining steps, then decodes
        return {}

    def _run(self) -> None:
        s = self.settings
        self._start = time.perf_counter()
        try:
            out = self.pipe(
                prompt=s.prompt,
                negative_prompt=s.negative_prompt or None,
                num_inference_steps=s.steps,
                height=s.height,
                width=s.width,
                guidance_scale=s.guidance_scale,
                generator=self.generator,
                callback_on_step_end=self._on_step,
            )
            self.seconds = time.perf_counter() - self._start - self._waited
            self.events.put(("done", out.images[0]))
        except BaseException as exc:  # handed to the consumer's thread, raised there
            self.events.put(("error", exc))

    def finish(self) -> None:
        """Stop at the next step if still running, and wait for the thread."""
        if self._thread.is_alive():
            self.stop.set()
            self.gate.set()
            while self._thread.is_alive():
                self.gate.set()  # a step event may still be on its way
                self._thread.join(0.05)


# ----------------------------------------------------------------------------- the comparison


def iter_compare_images(
    sources: list[ImageSource],
    settings: ImageSettings,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
) -> Generator[ImageEvent, None, list[ImageResult]]:
    """Generate ``settings`` through each pipeline in turn; yield events; return the results.

    The sources, settings and device are checked now (MergeStudioError). A pane
    whose folder is not a pipeline, lacks a component or fails ends "failed" with
    one sentence; the next pane runs. ``cancel`` stops the running pane at its next
    step ("stopped", partial image) and the panes after it end "stopped" unstarted.
    """
    from core.merge.executor import resolve_device

    if not isinstance(sources, (list, tuple)) or not MIN_PANES <= len(sources) <= MAX_PANES:
        count = len(sources) if isinstance(sources, (list, tuple)) else type(sources).__name__
        raise MergeStudioError(f"sources: compare {MIN_PANES} to {MAX_PANES} pipelines side by side, got {count}.")
    for i, s in enumerate(sources):
        if s.token_merging is not None and (
            not isinstance(s.token_merging, dict) or not isinstance(s.token_merging.get("method"), str)
        ):
            raise MergeStudioError(
                f"sources[{i}] ('{s.label}'): token_merging needs a 'method' ('tomesd' or 'todo'), "
                f"got {s.token_merging!r}."
            )
    settings.validate()
    dev = resolve_device(device)
    return _compare(list(sources), settings, dev, cancel or CancelToken())


def compare_images(
    sources: list[ImageSource],
    settings: ImageSettings,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
    on_event: Optional[Callable[[ImageEvent], None]] = None,
) -> list[ImageResult]:
    """Run :func:`iter_compare_images` to the end (``on_event`` sees every event); return the results."""
    # ``cancel`` goes to the comparison, not to drive(): a stopped run still returns its panes.
    return drive(iter_compare_images(sources, settings, device=device, cancel=cancel), on_event)


def _compare(
    sources: list[ImageSource], settings: ImageSettings, device: str, cancel: CancelToken
) -> Generator[ImageEvent, None, list[ImageResult]]:
    results: list[ImageResult] = []
    for pane, source in enumerate(sources):
        folder = Path(source.pipeline).expanduser()
        if cancel.cancelled:
            result = _unstarted(pane, source, folder)
        else:
            yield PaneStarted(pane, source.label)
            result = yield from _run_pane(pane, source, folder, settings, device, cancel)
        results.append(result)
        yield PaneFinished(pane, result)
    return results


def _unstarted(pane: int, source: ImageSource, folder: Path) -> ImageResult:
    return ImageResult(
        pane=pane, label=source.label, pipeline=str(folder), image=None, seconds=None, seconds_per_step=None,
        peak_memory_bytes=None, memory_kind=NO_MEMORY, status="stopped", error=None, steps_done=0,
        token_merging=source.token_merging, notes=["Not started: the comparison was stopped before this pane."],
    )


def _run_pane(
    pane: int, source: ImageSource, folder: Path, settings: ImageSettings, device: str, cancel: CancelToken
) -> Generator[ImageEvent, None, ImageResult]:
    import torch

    monitor = MemoryMonitor(device).start()
    started = time.perf_counter()
    pipe = None
    try:
        try:
            pipe = load_pipeline(folder, device)
        except Exception as exc:  # noqa: BLE001 - e.g. pipe.to(device) raising: this pane fails, the next runs
            result = _unstarted(pane, source, folder)
            result.status, result.notes = "failed", []
            if isinstance(exc, MergeStudioError):
                result.error = str(exc)
            elif isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
                result.error = f"{folder}: ran out of memory while loading on {device}."
            else:
                result.error = f"{folder}: failed while loading on {device} ({_reason(exc)})."
        else:
            load_s = time.perf_counter() - started
            result = yield from iter_image_pane(
                pipe, settings, pane=pane, label=source.label, pipeline=str(folder),
                token_merging=source.token_merging, device=device, cancel=cancel,
            )
            result.load_s = load_s
    finally:
        pipe = None
        peak = monitor.stop()
        free_memory(device)
    result.peak_memory_bytes, result.memory_kind = peak, monitor.kind
    return result


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: anything not JSON (a Path, a dtype) as its text."""
    return str(value)
