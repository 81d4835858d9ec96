"""core.tokens.lab (the Tokens panel's engine) and the engine additions it relies on.

Tiny random models from core.tokens.tiny (size="small"), saved into temporary folders;
every measurement runs 1 timed forward per side without warm-up (the figures are
checked for consistency, never for speed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from core.errors import MergeStudioError, ModelError
from core.jobs import drive
from core.tokens import apply, bench, lab, tiny
from core.tokens.bipartite import TokenMergeError, source_from_assignment

FAST = {"runs": 1, "warmup": 0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_small_heap():
    """One torch thread; the heap of imported libraries frozen out of the garbage collector.

    bench.peak_memory runs a full gc.collect() before each measured forward, which with
    transformers and diffusers imported scans a large heap; freezing what exists now
    (gc.freeze) keeps those collections cheap without changing what is measured.
    """
    import gc

    import diffusers  # noqa: F401 - imported before the freeze
    import transformers  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lab")
    out = {}
    for kind in ("vit", "bert", "unet"):
        tiny.build(kind, size="small").model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def vit(folders):
    return lab.load_model(folders["vit"])


@pytest.fixture(scope="module")
def bert(folders):
    return lab.load_model(folders["bert"])


@pytest.fixture(scope="module")
def unet(folders):
    return lab.load_model(folders["unet"])


def _pipeline(root, *, tokenizer: bool, scheduler: bool):
    """The test fixtures' SD pipeline with a loadable tiny UNet; optionally a tokenizer and a scheduler."""
    from tests.fixtures.tiny_models import make_diffusers_pipeline

    folder = make_diffusers_pipeline(root)
    # The fixture's UNet is a header-level stand-in; diffusers needs a real one to run.
    shutil.rmtree(folder / "unet")
    tiny.build("unet", size="small").model.save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    if tokenizer:
        from transformers import BertTokenizer

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "house", "tree", "sky", "the"]
        (root.parent / "vocab.txt").write_text("\n".join(words) + "\n")
        BertTokenizer(str(root.parent / "vocab.txt"), model_max_length=16).save_pretrained(folder / "tokenizer")
        index["tokenizer"] = ["transformers", "BertTokenizer"]
    if scheduler:
        from diffusers import DDIMScheduler

        DDIMScheduler(steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _state(model) -> tuple:
    """Weights, hook tables and instance forwards: everything a patch could leave behind."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
        for name, m in model.named_modules()
    ]
    return weights, hooks


def _same_state(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _forward(work):
    """The readout of one plain forward."""
    with torch.inference_mode():
        return work.readout(work.forward())


def _run(work) -> None:
    """One forward (patched or not), nothing read."""
    with torch.inference_mode():
        work.forward()


class _ForwardCounter:
    """Counts forwards of a model through a hook (removed on exit)."""

    def __init__(self, model):
        self.calls = 0
        self._hook = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


# --------------------------------------------------------------------------- sample images


def test_sample_images_are_the_scripts_output_and_small():
    import numpy as np
    from PIL import Image

    paths = lab.sample_images()
    assert [p.name for p in paths] == ["scene.png", "chart.png", "shapes.png"]
    sys.path.insert(0, str(paths[0].parent))
    try:
        import make_samples
    finally:
        sys.path.remove(str(paths[0].parent))
    for path in paths:
        assert path.stat().st_size < 100_000
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) >= 224
            drawn = getattr(make_samples, path.stem)()
            assert np.array_equal(np.asarray(image), np.asarray(drawn))  # deterministic, committed as drawn
    assert "CC0" in (paths[0].parent / "LICENSE.md").read_text()


# --------------------------------------------------------------------------- loading


def test_load_model_on_each_kind(vit, bert, unet, folders):
    assert (vit.kind, bert.kind, unet.kind) == ("vit", "bert", "unet")
    assert vit.name == "vit" and vit.path == folders["vit"] and vit.pipeline is None
    assert type(bert.model).__name__ == "BertModel" and bert.loaded.tokenizer is None
    assert type(unet.model).__name__ == "UNet2DConditionModel" and unet.text_encoder is None


def test_unsupported_folders_name_the_supported_classes(llama_family, tmp_path):
    with pytest.raises(ModelError) as error:
        lab.load_model(llama_family["base"])
    message = str(error.value)
    assert lab.SUPPORTED in message and "llama" in message.lower() and "\n" not in message
    from tests.fixtures.tiny_models import make_diffusers_pipeline

    vae = make_diffusers_pipeline(tmp_path / "pipe") / "vae"
    with pytest.raises(ModelError, match="AutoencoderKL.*" + lab.SUPPORTED.split(",")[0]):
        lab.load_model(vae)
    with pytest.raises(ModelError, match="does not exist"):
        lab.load_model(tmp_path / "missing")


# --------------------------------------------------------------------------- inputs


def test_image_workload_from_a_sample_image(vit):
    import numpy as np

    work = lab.make_workload(vit, lab.LabInput(batch=2))
    picture = work.extras["image"]
    assert picture.dtype == np.uint8 and picture.shape == (32, 32, 3) and work.extras["grid"] == (4, 4)
    assert work.extras["image_path"].endswith("scene.png")
    expected = (torch.from_numpy(picture).float() / 255 - 0.5) / 0.5
    pixels = work.inputs["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    assert torch.allclose(pixels[1], expected.permute(2, 0, 1), atol=1e-6)
    assert any("mean 0.5" in note for note in work.notes)


def test_image_is_center_cropped_and_normalised_with_the_folders_statistics(folders, tmp_path):
    from PIL import Image

    folder = tmp_path / "vit"
    shutil.copytree(folders["vit"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.2, 0.4, 0.6], "image_std": 0.25}))
    wide = Image.new("RGB", (96, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (32, 0, 64, 32))  # only the middle third is white
    wide.save(tmp_path / "wide.png")
    work = lab.make_workload(lab.load_model(folder), lab.LabInput(image=tmp_path / "wide.png"))
    assert work.extras["image"][4:28, 4:28].min() == 255  # scaled to cover, centre kept
    assert torch.allclose(work.inputs["pixel_values"][0, :, 16, 16], (1 - torch.tensor([0.2, 0.4, 0.6])) / 0.25)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_std": [1, 0, 1]}))
    with pytest.raises(MergeStudioError, match="preprocessor_config.json: image_std"):
        lab.make_workload(lab.load_model(folder), lab.LabInput(image=tmp_path / "wide.png"))


def test_unreadable_images_are_one_sentence_naming_the_file(vit, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    for path, why in ((fake, "not an image"), (tmp_path / "gone.png", "does not exist")):
        with pytest.raises(lab.LabError) as error:
            lab.make_workload(vit, lab.LabInput(image=path))
        assert str(path) in str(error.value) and why in str(error.value)


def test_text_workload_keeps_the_token_strings(bert):
    work = lab.make_workload(bert, lab.LabInput(text="Merge the tokens, quickly!"))
    assert work.extras["tokens"] == ["[CLS]", "merge", "the", "tokens", ",", "quickly", "!", "[SEP]"]
    assert work.inputs["input_ids"].shape == (1, 8)
    default = lab.make_workload(bert, lab.LabInput(batch=3))
    assert default.extras["text"] == bench.read_sentences()[0] and default.inputs["input_ids"].shape[0] == 3
    with pytest.raises(lab.LabError, match="sentence is empty"):
        lab.make_workload(bert, lab.LabInput(text="  "))
    with pytest.raises(lab.LabError, match="batch=0"):
        lab.make_workload(bert, lab.LabInput(batch=0))


def test_prompt_is_encoded_by_the_pipeline(tmp_path):
    folder = _pipeline(tmp_path / "sd", tokenizer=True, scheduler=True)
    model = lab.load_model(folder)
    assert type(model.pipeline).__name__ == "StableDiffusionPipeline" and model.pipeline.unet is model.model
    work = lab.make_workload(model, lab.LabInput(prompt="a red cat", timestep=999, resolution=64, batch=2))
    assert work.inputs["sample"].shape == (4, 4, 8, 8) and int(work.inputs["timestep"]) == 999
    assert torch.equal(work.inputs["sample"][:2], work.inputs["sample"][2:])  # the same latents in both halves
    cond, uncond = model.pipeline.encode_prompt("a red cat", "cpu", 1, True, negative_prompt="")
    expected = torch.cat([uncond, uncond, cond, cond])
    assert torch.allclose(work.inputs["encoder_hidden_states"], expected)
    assert work.extras["real_text"] and not any("random text" in n for n in work.notes)
    with pytest.raises(lab.LabError, match="timestep=1000"):
        lab.make_workload(model, lab.LabInput(timestep=1000, resolution=64))
    with pytest.raises(lab.LabError, match="resolution=60"):
        lab.make_workload(model, lab.LabInput(resolution=60))


def test_a_pipeline_without_tokenizer_gets_random_embeddings_with_a_note(tmp_path):
    model = lab.load_model(_pipeline(tmp_path / "sd", tokenizer=False, scheduler=False))
    assert model.pipeline is None and model.text_encoder is not None
    work = lab.make_workload(model, lab.LabInput(prompt="a cat", resolution=64))
    assert work.inputs["encoder_hidden_states"].shape == (2, bench.UNET_TEXT_TOKENS, 32)
    assert not work.extras["real_text"]
    assert any("random text embeddings" in note and "tokenizer" in note for note in work.notes)


# --------------------------------------------------------------------------- legal ranges


def test_r_bound_is_what_the_engine_accepts_for_vision(vit):
    work = lab.make_workload(vit, lab.LabInput())
    for method in ("tome", "pitome"):
        low, high = lab.legal_ranges(vit, work, method)["r"]
        assert low == 0 and high > 0
        with apply(vit.model, method=method, r=high):
            _run(work)
        with pytest.raises(TokenMergeError):
            apply(vit.model, method=method, r=high + 1)
    ranges = lab.legal_ranges(vit, work, "tome")
    assert ranges["threshold"] == (0.0, 1.0) and "prop_attn" not in ranges
    unprotected = lab.legal_ranges(vit, work, "tome", {"protect_cls": False})["r"][1]
    assert unprotected >= ranges["r"][1]
    with pytest.raises(TokenMergeError, match="tomesd"):
        lab.legal_ranges(vit, work, "tomesd")


@pytest.mark.parametrize("family, specials", [("deit", 2), ("clip", 1)])
def test_deit_and_clip_vision_folders(family, specials, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTModel

    small = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    if family == "deit":
        DeiTModel(DeiTConfig(intermediate_size=64, **small)).save_pretrained(tmp_path / family)
    else:
        CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **small)).save_pretrained(tmp_path / family)
    model = lab.load_model(tmp_path / family)
    work = lab.make_workload(model, lab.LabInput(image=lab.sample_images()[2]))
    assert work.tokens == 16 + specials
    high = lab.legal_ranges(model, work, "tome")["r"][1]
    with pytest.raises(TokenMergeError):
        apply(model.model, method="tome", r=high + 1)
    result = drive(lab.iter_evaluate(model, work, "tome", {"r": high}, **FAST))
    assert result.input_tokens == 16 + specials and result.output_tokens == 16 + specials - 2 * high
    view = result.groups
    assert view.grid == (4, 4) and all(len(g) == 16 for g in view.groups)  # special tokens left out
    assert len(set(view.groups[-1])) == result.output_tokens - specials


def test_r_bound_for_text_depends_on_the_sentence(bert):
    short = lab.make_workload(bert, lab.LabInput(text="a short sentence here"))
    long = lab.make_workload(bert, lab.LabInput())
    bounds = [lab.legal_ranges(bert, work, "tome")["r"][1] for work in (short, long)]
    assert bounds[0] < bounds[1]
    for work, high in zip((short, long), bounds):
        with apply(bert.model, method="tome", r=high):
            _run(work)
        with apply(bert.model, method="tome", r=high + 1), pytest.raises(TokenMergeError):
            _run(work)


def test_diffusion_bounds_are_accepted_and_one_step_above_refused(unet):
    work = lab.make_workload(unet, lab.LabInput(resolution=64))
    ranges = lab.legal_ranges(unet, work, "tomesd")
    assert ranges["ratio"] == (0.0, 0.75) and ranges["max_downsample"] == (1, 2)
    with apply(unet.model, method="tomesd", ratio=ranges["ratio"][1]):
        _run(work)
    with pytest.raises(TokenMergeError, match="ratio"):
        apply(unet.model, method="tomesd", ratio=ranges["ratio"][1] + 1e-6)
    assert lab.legal_ranges(unet, work, "tomesd", {"sx": 4, "sy": 1})["ratio"] == (0.0, 0.75)
    sx = ranges["sx"][1]
    assert sx == 8  # the 8x8 latent grid of the finest blocks
    with apply(unet.model, method="tomesd", sx=sx, sy=1, ratio=0.5):
        _run(work)
    with apply(unet.model, method="tomesd", sx=sx + 1, sy=1, ratio=0.5), pytest.raises(TokenMergeError):
        _run(work)
    todo = lab.legal_ranges(unet, work, "todo", {"max_downsample": 2})
    assert todo["downsample_method"][0] == "nearest-exact"
    factor = todo["downsample_factor"][1]
    assert factor == 4  # the mid block's 4x4 grid
    with apply(unet.model, method="todo", downsample_factor=factor, max_downsample=2):
        _run(work)
    with apply(unet.model, method="todo", downsample_factor=factor + 1, max_downsample=2):
        with pytest.raises(TokenMergeError, match="downsample_factor"):
            _run(work)


# --------------------------------------------------------------------------- evaluation


def test_image_evaluation_matches_bench_and_its_groups_match_the_tokens(vit):
    work = lab.make_workload(vit, lab.LabInput())
    reference = bench.run(work, "tome", {"r": 3}, **FAST)
    result = drive(lab.iter_evaluate(vit, work, "tome", {"r": 3}, **FAST))
    assert result.tokens_per_layer == reference["tokens_per_layer"] == [17, 14, 11]
    assert result.output_tokens == reference["output_tokens"] == 8
    assert result.cosine == pytest.approx(reference["cosine"], abs=1e-12)
    assert result.layer_labels == ["layer 0", "layer 1", "layer 2"] and result.touched_blocks == 3
    assert result.bench["restored_exactly"] is True and result.input_tokens == 17
    view = result.groups
    assert view.kind == "image" and view.grid == (4, 4) and view.image.shape == (32, 32, 3)
    assert view.labels == ["after layer 0", "after layer 1", "after layer 2"]
    assert all(len(g) == 16 for g in view.groups)  # patches only, CLS left out
    assert [len(set(g)) for g in view.groups] == view.group_counts == [13, 10, 7]  # tokens left minus CLS
    figures = json.loads(json.dumps(result.figures()))
    assert figures["speedup"] == result.speedup and figures["tokens_per_layer"] == [17, 14, 11]
    assert "groups" not in figures and figures["touched_blocks"] == 3


def test_text_groups_follow_the_sentence(bert):
    work = lab.make_workload(bert, lab.LabInput(text="the cat sat on the mat and the cat sat on the hat"))
    result = drive(lab.iter_evaluate(bert, work, "tome", {"r": 2}, **FAST))
    view = result.groups
    assert view.kind == "text" and view.tokens == work.extras["tokens"] and view.grid is None
    assert len(view.groups[-1]) == len(view.tokens) == result.input_tokens
    assert len(set(view.groups[-1])) == result.output_tokens == result.input_tokens - 6
    assert view.groups[-1][0] == 0  # CLS is protected: its own group


def test_threshold_mode_counts_tokens_per_input(bert):
    work = lab.make_workload(bert, lab.LabInput(batch=2))
    result = drive(lab.iter_evaluate(bert, work, "tome", {"threshold": 0.0}, **FAST))
    counts = result.groups.counts_per_input
    assert len(counts) == 2 and counts[0] == result.output_tokens  # same sentence twice: same count
    assert len(set(result.groups.groups[-1])) == counts[0]


def test_nothing_merged_is_reported_in_the_first_note(vit, unet):
    work = lab.make_workload(vit, lab.LabInput())
    result = drive(lab.iter_evaluate(vit, work, "tome", {"r": 0}, **FAST))
    assert result.touched_blocks == 0 and result.notes[0].startswith("the patch changed no layer")
    assert result.cosine == 1.0 and len(set(result.groups.groups[-1])) == 16
    work = lab.make_workload(unet, lab.LabInput(resolution=64))
    result = drive(lab.iter_evaluate(unet, work, "tomesd", {"ratio": 0.01}, **FAST))
    assert result.touched_blocks == 0 and "ratio=0.01 is too small" in result.notes[0]
    result = drive(lab.iter_evaluate(unet, work, "todo", {"downsample_factor": 1}, **FAST))
    assert result.touched_blocks == 0 and "downsample_factor=1" in result.notes[0]


def test_diffusion_evaluation_and_block_groups(unet):
    work = lab.make_workload(unet, lab.LabInput(resolution=64))
    result = drive(lab.iter_evaluate(unet, work, "tomesd", {"ratio": 0.5}, group_block=1, **FAST))
    reference = bench.run(work, "tomesd", {"ratio": 0.5}, **FAST)
    assert result.tokens_per_layer == reference["tokens_per_layer"] == [32, 32, 32]
    assert result.layer_labels == ["down.0.attn.0", "up.1.attn.0", "up.1.attn.1"]
    assert result.input_tokens_per_layer == [64, 64, 64] and result.touched_blocks == 3
    view = result.groups
    assert view.kind == "diffusion" and view.labels == ["up.1.attn.0"] and view.block_index == 1
    assert view.grid == (8, 8) and len(set(view.groups[0])) == 32
    todo = drive(lab.iter_evaluate(unet, work, "todo", {"downsample_factor": 2}, **FAST))
    assert todo.tokens_per_layer == [16, 16, 16] and todo.tokens_measure.startswith("key/value")
    assert len(set(todo.groups.groups[0])) == 16
    with pytest.raises(TokenMergeError, match="record_block"):
        drive(lab.iter_evaluate(unet, work, "tomesd", {"ratio": 0.5}, group_block=3, **FAST))


def test_option_errors_come_before_any_forward(bert, vit):
    work = lab.make_workload(bert, lab.LabInput(text="four words only here"))
    with _ForwardCounter(bert.model) as counter:
        with pytest.raises(TokenMergeError, match="r=5"):
            next(lab.iter_evaluate(bert, work, "tome", {"r": 5}, **FAST))
        with pytest.raises(TokenMergeError, match="not an option"):
            next(lab.iter_evaluate(bert, work, "tome", {"r": 1, "speed": 2}, **FAST))
        with pytest.raises(TokenMergeError, match="r=5"):
            next(lab.iter_sweep(bert, work, "tome", {}, "r", [1, 5], **FAST))
        assert counter.calls == 0
    with pytest.raises(lab.LabError, match="another model"):
        next(lab.iter_evaluate(vit, work, "tome", {"r": 1}, **FAST))


@pytest.mark.parametrize("kind, method, options", [("vit", "tome", {"r": 3}), ("unet", "tomesd", {"ratio": 0.5})])
def test_closing_mid_way_restores_the_model_exactly(kind, method, options, vit, unet):
    model = {"vit": vit, "unet": unet}[kind]
    work = lab.make_workload(model, lab.LabInput(resolution=64 if kind == "unet" else None))
    before, output = _state(model.model), _forward(work)
    job = lab.iter_evaluate(model, work, method, options, runs=2, warmup=1)
    steps = []
    for step in job:
        steps.append(step)
        if f"with {method}" in step.message:
            break  # the patch is in place now
    assert _state(model.model)[1] != before[1]  # hooks / instance forwards in place
    job.close()
    assert _same_state(_state(model.model), before)
    assert torch.equal(_forward(work), output)
    assert [s.done for s in steps] == list(range(1, len(steps) + 1))
    assert steps[-1].total == bench.forward_count(2, 1)


def test_sweep_gives_one_result_per_value(vit):
    work = lab.make_workload(vit, lab.LabInput(image=lab.sample_images()[1]))
    job = lab.iter_sweep(vit, work, "tome", {"prop_attn": True}, "r", [0, 2, 4], **FAST)
    steps = []
    try:
        while True:
            steps.append(next(job))
    except StopIteration as stop:
        results = stop.value
    assert [r.options["r"] for r in results] == [0, 2, 4]
    assert [r.output_tokens for r in results] == [17, 11, 5]
    assert all(r.options["prop_attn"] is True for r in results)
    assert [s.done for s in steps] == list(range(1, 3 * bench.forward_count(1, 0) + 1))
    assert steps[0].message.startswith("r=0 (1/3)")
    with pytest.raises(lab.LabError, match="no values"):
        next(lab.iter_sweep(vit, work, "tome", {}, "r", []))


# --------------------------------------------------------------------------- python line


def test_python_line_executes(vit, unet):
    import core

    line = lab.python_line("tome", {"r": (3, -1.0), "prop_attn": False})
    assert line == 'core.tokens.apply(model, method="tome", r=(3, -1.0), prop_attn=False)'
    handle = eval(line, {"core": core, "model": vit.model})
    try:
        assert handle.active and handle.options["r"] == (3, -1.0) and handle.options["prop_attn"] is False
    finally:
        handle.remove()
    line = lab.python_line("todo", {"downsample_factor": 2, "downsample_method": "avg_pool"})
    assert line.endswith('downsample_factor=2, downsample_method="avg_pool")')
    namespace = {"core": core, "model": unet.model}
    exec(f"handle = {line}", namespace)
    namespace["handle"].remove()
    with pytest.raises(lab.LabError, match="finite"):
        lab.python_line("tome", {"threshold": float("nan")})
    with pytest.raises(lab.LabError, match="keyword"):
        lab.python_line("tome", {"not valid": 1})


# --------------------------------------------------------------------------- engine additions


def test_layer_assignments_match_shorter_schedules_and_sources(vit):
    work = lab.make_workload(vit, lab.LabInput(batch=2))
    schedule = [0, 3, 2]
    with apply(vit.model, method="tome", r=schedule, trace_source=True) as handle:
        _run(work)
        layers = handle.layer_assignments
        final = handle.assignment
        sources = handle.sources
    assert len(layers) == 3 and layers[0] is None
    assert torch.equal(layers[-1], final) and layers[-1].dtype == torch.int64
    assert torch.equal(source_from_assignment(layers[-1], sources.shape[1]), sources)
    # After layer i the assignment is what a run that stops merging after layer i ends with.
    for i in (1,):
        shorter = schedule[: i + 1] + [0] * (len(schedule) - i - 1)
        with apply(vit.model, method="tome", r=shorter) as handle:
            _run(work)
            assert torch.equal(handle.assignment, layers[i])
    assert int(layers[1].max()) + 1 == 17 - 3


def test_record_block_groups_are_destinations(unet):
    work = lab.make_workload(unet, lab.LabInput(resolution=64))
    with apply(unet.model, method="tomesd", ratio=0.5, max_downsample=2) as handle:
        names = handle.block_names()
        assert names == ["down.0.attn.0", "mid.attn.0", "up.1.attn.0", "up.1.attn.1"]
        assert handle.block_groups is None
        handle.record_block(1)
        _run(work)
        recorded = handle.block_groups
        groups = recorded["groups"]
        assert recorded["name"] == "mid.attn.0" and recorded["grid"] == (4, 4) and groups.shape == (2, 16)
        assert recorded["count"] == 16 - int(16 * 0.5) == handle.stats["tokens_per_layer"][1]
        for row in groups:
            assert len(set(row.tolist())) == recorded["count"]
            assert torch.equal(row[row], row)  # each group id is a token of its own group: the destination
        handle.record_block(None)
        _run(work)
        assert handle.block_groups is None
        with pytest.raises(TokenMergeError, match="4 blocks"):
            handle.record_block(4)
    with apply(unet.model, method="todo", downsample_factor=2) as handle:
        handle.record_block(0)
        _run(work)
        cells = handle.block_groups
        assert cells["kv_grid"] == (4, 4) and cells["count"] == handle.stats["kv_tokens_per_layer"][0] == 16
        grid = cells["groups"][0].reshape(8, 8)
        assert torch.equal(grid[:2, :2], torch.zeros(2, 2, dtype=torch.long)) and int(grid[7, 7]) == 15


def test_importing_lab_is_cheap():
    code = "import sys, core.tokens.lab; print('torch' in sys.modules, 'PIL' in sys.modules)"
    root = lab.SAMPLES_DIR.parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.split() == ["False", "False"]
