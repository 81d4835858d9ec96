"""Side-by-side image generation (core.generate.image) on a tiny but complete SD pipeline."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import MergeStudioError
from core.generate.image import (
    ImageSettings,
    ImageSource,
    PaneFinished,
    PaneStarted,
    PaneStep,
    compare_images,
    difference_image,
    iter_compare_images,
    iter_image_pane,
    load_pipeline,
)
from core.jobs import CancelToken
from tests.fixtures.tiny_pipelines import make_generation_pipeline

PROMPT = "a photo of a red cat"
SIZE = 32  # the tiny VAE halves, so 16 x 16 latents: 256 tokens in the first UNet block


def settings(**kw) -> ImageSettings:
    base = dict(prompt=PROMPT, seed=0, steps=2, height=SIZE, width=SIZE, guidance_scale=7.5)
    base.update(kw)
    return ImageSettings(**base)


def run(sources, s, cancel=None, on_step=None):
    events: list = []

    def record(e):
        events.append(e)
        if on_step is not None and isinstance(e, PaneStep):
            on_step(e)

    return compare_images(sources, s, cancel=cancel, on_event=record), events


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genpipes")
    p0 = make_generation_pipeline(root / "tiny-sd", seed=0)
    copy = root / "tiny-sd-copy"
    shutil.copytree(p0, copy)
    no_tok = root / "tiny-sd-no-tokenizer"
    shutil.copytree(p0, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    no_vae = root / "tiny-sd-no-vae"
    shutil.copytree(p0, no_vae)
    shutil.rmtree(no_vae / "vae")
    return {"p0": p0, "copy": copy, "no_tokenizer": no_tok, "no_vae": no_vae}


@pytest.fixture(scope="module")
def reference(pipes) -> Image.Image:
    """diffusers' own output for settings() (seed 0), called directly."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipes["p0"]), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    s = settings()
    return pipe(prompt=s.prompt, num_inference_steps=s.steps, height=s.height, width=s.width,
                guidance_scale=s.guidance_scale, generator=torch.Generator("cpu").manual_seed(0)).images[0]


@pytest.fixture(scope="module")
def same_seed(pipes):
    """One comparison: the pipeline and its copy, seed 0."""
    return run([ImageSource("p0", str(pipes["p0"])), ImageSource("copy", str(pipes["copy"]))], settings())


# ----------------------------------------------------------------------------- determinism


def test_identical_pipelines_same_seed_give_identical_images_equal_to_diffusers(same_seed, reference):
    (a, b), _ = same_seed
    assert a.status == b.status == "done"
    assert a.image.size == (SIZE, SIZE)
    assert np.array_equal(pixels(a.image), pixels(b.image))
    assert np.array_equal(pixels(a.image), pixels(reference))
    diff, stats = difference_image(a.image, b.image)
    assert stats == {"mean_abs": 0.0, "max_abs": 0.0, "psnr": math.inf}
    assert not pixels(diff).any()


def test_a_different_seed_gives_a_different_image(pipes, same_seed):
    (a, _), _ = same_seed
    # The failed pane first: the next one still runs.
    (broken, other), _ = run(
        [ImageSource("no tokenizer", str(pipes["no_tokenizer"])), ImageSource("p0", str(pipes["p0"]))], settings(seed=1)
    )
    assert other.status == "done"
    assert not np.array_equal(pixels(a.image), pixels(other.image))
    assert difference_image(a.image, other.image)[1]["mean_abs"] > 0


def test_step_events_and_their_order(same_seed):
    results, events = same_seed
    for pane in (0, 1):
        steps = [e for e in events if isinstance(e, PaneStep) and e.pane == pane]
        assert [(e.step, e.total) for e in steps] == [(1, 2), (2, 2)]
        mine = [e for e in events if e.pane == pane]
        assert isinstance(mine[0], PaneStarted) and isinstance(mine[-1], PaneFinished)
        assert mine[-1].result is results[pane]
        r = results[pane]
        assert r.steps_done == r.total_steps == 2
        assert r.seconds > 0 and 0 < r.seconds_per_step <= r.seconds
        assert r.peak_memory_bytes is not None and r.memory_kind.startswith("process RSS")


# ----------------------------------------------------------------------------- stop and failures


def test_stop_after_step_1_ends_the_pane_stopped_with_the_partial_image(pipes):
    from diffusers import StableDiffusionPipeline

    cancel = CancelToken()
    s = settings(steps=3)
    results, events = run(
        [ImageSource("p0", str(pipes["p0"])), ImageSource("copy", str(pipes["copy"]))], s, cancel=cancel,
        on_step=lambda e: cancel.cancel() if e.step == 1 else None,
    )
    first, second = results
    assert first.status == "stopped" and first.steps_done == 1 and first.total_steps == 3
    assert [e.step for e in events if isinstance(e, PaneStep)] == [1]
    assert second.status == "stopped" and second.image is None and second.steps_done == 0
    assert not any(isinstance(e, PaneStarted) and e.pane == 1 for e in events)
    # The partial image is diffusers' own output when interrupted after the first step.
    pipe = StableDiffusionPipeline.from_pretrained(str(pipes["p0"]), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def interrupt(p, i, t, kw):
        p._interrupt = True
        return {}

    want = pipe(prompt=s.prompt, num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=s.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=interrupt).images[0]
    assert np.array_equal(pixels(first.image), pixels(want))


def test_closing_the_generator_stops_the_worker(pipes):
    sources = [ImageSource("p0", str(pipes["p0"])), ImageSource("c", str(pipes["copy"]))]
    work = iter_compare_images(sources, settings(steps=4))
    while not isinstance(next(work), PaneStep):
        pass
    work.close()  # returns only once the pipeline thread has finished
    import threading

    assert not any(t.name == "image-pane" for t in threading.enumerate())


def test_missing_components_fail_their_pane_naming_folder_and_component(pipes):
    results, _ = run(
        [ImageSource("no tokenizer", str(pipes["no_tokenizer"])), ImageSource("no vae", str(pipes["no_vae"])),
         ImageSource("fine", str(pipes["p0"]))],
        settings(steps=1),
    )
    assert [r.status for r in results] == ["failed", "failed", "done"]
    assert str(pipes["no_tokenizer"]) in results[0].error and "'tokenizer/'" in results[0].error
    assert str(pipes["no_vae"]) in results[1].error and "'vae/'" in results[1].error
    assert all(r.image is None and r.error.count("\n") == 0 for r in results[:2])


def test_settings_and_sources_are_checked_up_front(pipes):
    two = [ImageSource("a", str(pipes["p0"])), ImageSource("b", str(pipes["copy"]))]
    with pytest.raises(MergeStudioError, match="height: must be a multiple of 8"):
        iter_compare_images(two, settings(height=60))
    with pytest.raises(MergeStudioError, match="width"):
        iter_compare_images(two, settings(width=0))
    with pytest.raises(MergeStudioError, match="steps"):
        iter_compare_images(two, settings(steps=0))
    with pytest.raises(MergeStudioError, match="2 to 4"):
        iter_compare_images(two[:1], settings())
    with pytest.raises(MergeStudioError, match="token_merging"):
        iter_compare_images([two[0], ImageSource("tm", str(pipes["p0"]), {"ratio": 0.5})], settings())
    s = settings(negative_prompt="blurry", guidance_scale=5.0)
    assert ImageSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(MergeStudioError, match="unknown field"):
        ImageSettings.from_json({"prompt": "x", "cfg": 3})


# ----------------------------------------------------------------------------- token merging


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_token_merging_pane_runs_and_leaves_the_pipeline_unpatched(pipes, same_seed):
    (plain, _), _ = same_seed
    pipe = load_pipeline(pipes["p0"], "cpu")
    hooks_before = _hook_count(pipe.unet)

    def drain(work):
        try:
            while True:
                next(work)
        except StopIteration as stop:
            return stop.value

    merged = drain(iter_image_pane(pipe, settings(), token_merging={"method": "tomesd", "ratio": 0.5}))
    assert merged.status == "done" and merged.token_merging == {"method": "tomesd", "ratio": 0.5}
    stats = merged.token_stats
    assert stats["method"] == "tomesd" and stats["patched_blocks"] > 0
    n = stats["input_tokens_per_layer"][0]
    assert stats["tokens_per_layer"][0] == n - int(0.5 * n)  # tomesd's r = int(ratio * N)
    assert not np.array_equal(pixels(merged.image), pixels(plain.image))
    assert _hook_count(pipe.unet) == hooks_before
    again = drain(iter_image_pane(pipe, settings()))  # the same pipeline, merging off: as never patched
    assert np.array_equal(pixels(again.image), pixels(plain.image))


def test_bad_token_merging_options_fail_the_pane_only(pipes):
    results, _ = run(
        [ImageSource("tm", str(pipes["p0"]), {"method": "tomesd", "ratio": 0.9}),
         ImageSource("plain", str(pipes["p0"]))],
        settings(steps=1),
    )
    assert results[0].status == "failed" and "ratio" in results[0].error
    assert results[1].status == "done"


# ----------------------------------------------------------------------------- difference image, saving


def test_difference_image_against_the_formula():
    a = Image.new("RGB", (4, 3), (0, 0, 0))
    b = Image.new("RGB", (4, 3), (10, 20, 70))
    diff, stats = difference_image(a, b, gain=4.0)
    assert pixels(diff)[0, 0].tolist() == [40, 80, 255]  # 70 * 4 is clipped
    assert stats["mean_abs"] == pytest.approx((10 + 20 + 70) / 3)
    assert stats["max_abs"] == 70
    assert stats["psnr"] == pytest.approx(10 * math.log10(255**2 / ((100 + 400 + 4900) / 3)))
    with pytest.raises(MergeStudioError, match="size"):
        difference_image(a, Image.new("RGB", (3, 3)))
    with pytest.raises(MergeStudioError, match="gain"):
        difference_image(a, b, gain=0)


def test_result_saves_a_png_and_serialises_without_pixels(same_seed, tmp_path):
    (a, _), _ = same_seed
    path = a.save(tmp_path / "out")
    assert path.suffix == ".png" and path.parent == tmp_path / "out"
    assert np.array_equal(pixels(Image.open(path)), pixels(a.image))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]  # no temporary file left
    data = a.to_json()
    assert "image" not in data and data["image_size"] == [SIZE, SIZE]
    json.dumps(data)
    a_failed = type(a)(**{**{f: getattr(a, f) for f in a.__dataclass_fields__}, "image": None, "status": "failed"})
    with pytest.raises(MergeStudioError, match="no image"):
        a_failed.save(tmp_path)


# ----------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize("when", ["at PaneStarted", "during the load"])
def test_stop_pressed_while_the_pipeline_loads_runs_no_step(pipes, monkeypatch, when):
    import core.generate.image as image

    real, calls = image.load_pipeline, []

    def load(folder, device):
        pipe = real(folder, device)
        pipe.unet.register_forward_hook(lambda *a: calls.append("unet"))
        pipe.vae.register_forward_hook(lambda *a: calls.append("vae"))
        if when == "during the load":
            cancel.cancel()  # the GUI thread sets it while the weights are read
        return pipe

    monkeypatch.setattr(image, "load_pipeline", load)
    cancel = CancelToken()
    events: list = []

    def record(event):
        events.append(event)
        if isinstance(event, PaneStarted) and when == "at PaneStarted":
            cancel.cancel()  # Stop, while pane 0 is about to load

    sources = [ImageSource("p0", str(pipes["p0"])), ImageSource("copy", str(pipes["copy"]))]
    first, second = compare_images(sources, settings(), cancel=cancel, on_event=record)
    assert calls == []
    assert first.status == "stopped" and first.image is None and first.error is None
    assert first.steps_done == 0 and first.load_s is not None
    assert not any(isinstance(e, PaneStep) for e in events)
    assert second.status == "stopped" and second.image is None


def test_an_unexpected_error_while_loading_fails_that_pane_only(pipes, monkeypatch):
    from diffusers import DiffusionPipeline

    real, moves = DiffusionPipeline.to, []

    def to(self, *args, **kwargs):
        moves.append(args)
        if len(moves) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "to", to)
    results, _ = run([ImageSource("p0", str(pipes["p0"])), ImageSource("copy", str(pipes["copy"]))], settings())
    assert [r.status for r in results] == ["failed", "done"]
    assert results[0].error == (
        f"{pipes['p0']}: failed while loading on cpu (RuntimeError: CUDA error: an illegal memory access was "
        "encountered)."
    )
    assert results[0].image is None and results[1].image.size == (SIZE, SIZE)
