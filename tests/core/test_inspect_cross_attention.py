"""Cross-attention maps per prompt token (DAAM) on a tiny complete SD pipeline.

References are written out here: the probabilities come from the layer's own to_q /
to_k weights applied to hidden states caught by a forward pre-hook, the upsampling from
torch's bilinear interpolation of each layer's map, and the image from a plain pipeline
call without any capture.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import CancelledError, MergeStudioError, ModelError
from core.inspect import cross_attention as ca
from core.jobs import CancelToken, drive
from tests.fixtures.tiny_pipelines import make_generation_pipeline

PROMPT = "a red cat on a blue house, painting"
LONG = " ".join(["a photo of the red cat"] * 20)  # 120 words -> more than 75 tokens
RUN = dict(steps=2, height=64, width=64, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_generation_pipeline(tmp_path_factory.mktemp("ca") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def square(pipe):
    return ca.cross_attention(pipe, PROMPT, **RUN)


def _prompt_ids(pipe, text):
    """The tokenizer's own ids (with __call__), minus start/end/pad."""
    tok = pipe.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return [i for i in tok(text, truncation=False).input_ids if i not in special]


def _processors(pipe):
    return {name: m.processor for name, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}


def _plain_image(pipe, prompt, **kw):
    out = pipe(prompt, negative_prompt="", num_inference_steps=kw["steps"], height=kw["height"], width=kw["width"],
               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="np")
    return out.images[0]


# ----------------------------------------------------------------------------- shapes and tokens


def test_one_map_per_prompt_token(pipe, square):
    ids = _prompt_ids(pipe, PROMPT)
    assert len(square.tokens) == len(ids) == 9  # "," is a token of its own
    assert square.tokens == [pipe.tokenizer.decode([i]).strip() for i in ids]
    assert square.maps.shape == (len(ids), 64, 64) and square.maps.dtype == np.float32
    assert square.token_chunks == [0] * len(ids) and square.chunks == 1
    assert square.image.shape == (64, 64, 3) and square.image.dtype == np.uint8
    # each map normalised by its own maximum, which raw_max keeps
    assert np.allclose(square.maps.reshape(len(ids), -1).max(axis=1), 1.0, atol=1e-6)
    assert square.maps.min() >= 0.0
    assert len(square.raw_max) == len(ids) and all(v > 0 for v in square.raw_max)
    assert square.timesteps == [0, 1]
    assert square.layers == ca.attention_layers(pipe) and square.heads == "all"


def test_non_square_size(pipe):
    r = ca.cross_attention(pipe, PROMPT, steps=2, height=64, width=96, seed=0)
    assert r.maps.shape == (len(_prompt_ids(pipe, PROMPT)), 64, 96)
    assert r.image.shape == (64, 96, 3) and (r.height, r.width) == (64, 96)


def test_long_prompt_spans_two_windows(pipe):
    ids = _prompt_ids(pipe, LONG)
    assert 75 < len(ids) <= 150
    r = ca.cross_attention(pipe, LONG, **RUN)
    assert r.chunks == 2
    assert len(r.tokens) == len(ids) and r.maps.shape == (len(ids), 64, 64)
    assert r.token_chunks == [0] * 75 + [1] * (len(ids) - 75)
    assert any("75-token windows" in n for n in r.notes)
    assert np.isfinite(r.maps).all()


def test_chunking_formula():
    bos, eos, pad = 1, 2, 0
    ids = list(range(10, 10 + 80))
    chunks = ca.chunk_token_ids(ids, bos, eos, pad)
    assert chunks[0] == [bos] + ids[:75] + [eos]
    assert chunks[1] == [bos] + ids[75:] + [eos] + [pad] * 70
    assert all(len(c) == 77 for c in chunks)
    assert ca.chunk_token_ids([], bos, eos, pad) == [[bos, eos] + [pad] * 75]


def test_window_encoding_matches_pipeline_encoding(pipe):
    """One window encoded by encode_chunks equals the pipeline's own encode_prompt."""
    tok = pipe.tokenizer
    chunks = ca.chunk_token_ids(_prompt_ids(pipe, PROMPT), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert chunks == [tok(PROMPT, padding="max_length", max_length=77).input_ids]
    ours = ca.encode_chunks(pipe, chunks)
    theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    assert ours.shape == (1, 77, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_latent_grid():
    assert ca.latent_grid(32 * 48, 32, 48) == (32, 48)
    assert ca.latent_grid(16 * 24, 32, 48) == (16, 24)
    assert ca.latent_grid(7 * 4, 13, 7) == (7, 4)  # ceil halving, as stride-2 convolutions do
    with pytest.raises(MergeStudioError):
        ca.latent_grid(100, 32, 48)


def test_attention_layers(pipe, folder):
    names = ca.attention_layers(pipe)
    expected = [n for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    assert sorted(names) == sorted(expected) and len(names) == 4
    levels = [ca.layer_level(n) for n in names]
    assert levels == sorted(levels, key=ca.LEVELS.index) and set(levels) == {"down", "mid", "up"}
    assert ca.attention_layers(folder) == names


# ----------------------------------------------------------------------------- numerics


def test_capture_leaves_the_image_unchanged(pipe):
    before = _processors(pipe)
    plain = _plain_image(pipe, PROMPT, **RUN)
    scale = pipe.vae_scale_factor
    with ca.CrossAttentionRecorder(pipe.unet, 64 // scale, 64 // scale) as rec:
        assert all(isinstance(m.processor, ca._CaptureProcessor) for m in rec.modules.values())
        captured = _plain_image(pipe, PROMPT, **RUN)
    assert rec.recorder.sums  # it really captured something
    assert np.abs(captured - plain).max() <= 1e-5
    assert _processors(pipe) == before
    r = ca.cross_attention(pipe, PROMPT, **RUN)
    assert np.array_equal(r.image, np.clip(np.rint(plain * 255), 0, 255).astype(np.uint8))


def _direct(attn, hs, ehs, heads=None, cond=1):
    """softmax(Q K^T / sqrt(d)) for the conditional half, written out: [heads, N, 77]."""
    h, e = hs[cond:cond + 1], ehs[cond:cond + 1]  # with guidance the pipeline batches [negative, prompt]
    q = h @ attn.to_q.weight.T
    k = e @ attn.to_k.weight.T
    n_heads = attn.heads
    d = q.shape[-1] // n_heads
    q = q.reshape(1, -1, n_heads, d).permute(0, 2, 1, 3)[0]
    k = k.reshape(1, -1, n_heads, d).permute(0, 2, 1, 3)[0]
    p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    return p if heads is None else p[heads]


def _as_map(probs, grid, positions, size):
    """Sum heads, keep the prompt positions, reshape to the grid and upsample: [T, H, W]."""
    per_token = probs.sum(0)[:, positions].T.reshape(len(positions), *grid)
    return F.interpolate(per_token[None], size=size, mode="bilinear", align_corners=False)[0]


def test_probabilities_equal_direct_computation(pipe):
    """Maps for chosen layers/steps/heads equal the formula on hooked hidden states (64 x 96)."""
    down, mid = ca.attention_layers(pipe)[:2]
    modules = dict(pipe.unet.named_modules())
    calls: dict[str, list] = {down: [], mid: []}

    def hook(name):
        def pre(module, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            calls[name].append((hs.detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in calls]
    try:
        one = ca.cross_attention(pipe, PROMPT, steps=2, height=64, width=96, seed=1, layers=[mid], timesteps=[1],
                                 heads=[0, 2])
        for c in calls.values():
            c.clear()
        both = ca.cross_attention(pipe, PROMPT, steps=2, height=64, width=96, seed=1, layers=[down, mid])
    finally:
        for h in handles:
            h.remove()
    T = len(one.tokens)
    positions = list(range(1, T + 1))
    grids = {down: (32, 48), mid: (16, 24)}  # latent 32 x 48 (VAE factor 2), then halved
    assert all(len(c) == 2 for c in calls.values())  # one call per step

    # one layer, step 1 only, heads 0 and 2
    hs, ehs = calls[mid][1]  # same seed -> the same hidden states as in the first run
    expected = _as_map(_direct(modules[mid], hs, ehs, heads=[0, 2]), grids[mid], positions, (64, 96))
    got = torch.from_numpy(one.maps) * torch.tensor(one.raw_max)[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert one.timesteps == [1] and one.layers == [mid] and one.heads == "0,2"

    # two layers at two resolutions, every step, every head: upsample each map, then sum
    expected = sum(_as_map(_direct(modules[n], hs, ehs), grids[n], positions, (64, 96))
                   for n in (down, mid) for hs, ehs in calls[n])
    got = torch.from_numpy(both.maps) * torch.tensor(both.raw_max)[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(both.raw_max), expected.flatten(1).amax(1), rtol=1e-5, atol=1e-6)


def test_without_guidance_the_batch_is_the_prompt(pipe):
    mid = ca.attention_layers(pipe)[1]
    module = dict(pipe.unet.named_modules())[mid]
    calls = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs.get("hidden_states", args[0] if args else None).clone(),
                                              kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        r = ca.cross_attention(pipe, PROMPT, **RUN, guidance_scale=1.0, layers=[mid], timesteps=[0])
    finally:
        handle.remove()
    hs, ehs = calls[0]
    assert hs.shape[0] == 1  # no negative half
    positions = list(range(1, len(r.tokens) + 1))
    expected = _as_map(_direct(module, hs, ehs, cond=0), (16, 16), positions, (64, 64))
    got = torch.from_numpy(r.maps) * torch.tensor(r.raw_max)[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_same_seed_same_maps(pipe, square):
    again = ca.cross_attention(pipe, PROMPT, **RUN)
    assert np.array_equal(again.maps, square.maps) and np.array_equal(again.image, square.image)
    other = ca.cross_attention(pipe, PROMPT, **{**RUN, "seed": 4})
    assert not np.array_equal(other.image, square.image)


# ----------------------------------------------------------------------------- jobs and clean-up


def test_progress_and_restored_processors(pipe, folder):
    before = _processors(pipe)
    seen = []
    r = drive(ca.iter_cross_attention(pipe, PROMPT, **RUN), on_progress=seen.append)
    assert [p.done for p in seen] == [0, 1, 2, 3] and all(p.total == 3 for p in seen)
    assert r.maps.shape[0] == len(r.tokens)
    assert _processors(pipe) == before
    r2 = ca.cross_attention(folder, PROMPT, **RUN)  # from the folder: same pipeline, same result
    assert r2.pipeline == str(folder) and np.array_equal(r2.maps, r.maps)


def test_cancel_stops_and_restores(pipe):
    before = _processors(pipe)
    token = CancelToken()
    steps_seen = []

    def on_progress(p):
        steps_seen.append(p.done)
        if p.done == 1:
            token.cancel()

    with pytest.raises(CancelledError):
        drive(ca.iter_cross_attention(pipe, PROMPT, steps=5, height=64, width=64, cancel=token), on_progress)
    assert steps_seen == [0, 1]
    assert _processors(pipe) == before

    # closing the generator mid-run stops the worker at its next step as well
    gen = ca.iter_cross_attention(pipe, PROMPT, steps=5, height=64, width=64)
    next(gen), next(gen)
    assert any(isinstance(m.processor, ca._CaptureProcessor) for m in pipe.unet.modules() if hasattr(m, "processor"))
    gen.close()
    assert _processors(pipe) == before
    assert not any(t.name == "cross-attention" and t.is_alive() for t in threading.enumerate())


# ----------------------------------------------------------------------------- errors


def _one_sentence(exc):
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


@pytest.mark.parametrize("kw, words", [
    ({"height": 60}, ["height=60", "multiple of 8"]),
    ({"width": 70}, ["width=70", "multiple of 8"]),
    ({"timesteps": [2]}, ["timesteps", "0..1"]),
    ({"timesteps": [-1]}, ["timesteps", "-1"]),
    ({"heads": [8]}, ["heads", "0..7"]),
])
def test_bad_options(pipe, kw, words):
    before = _processors(pipe)
    with pytest.raises(MergeStudioError) as exc:
        ca.cross_attention(pipe, PROMPT, **{**RUN, **kw})
    msg = _one_sentence(exc)
    assert all(w in msg for w in words), msg
    assert _processors(pipe) == before


def test_bad_layer_lists_valid_ones(pipe):
    with pytest.raises(MergeStudioError) as exc:
        ca.cross_attention(pipe, PROMPT, **RUN, layers=["down_blocks.9.attn2"])
    msg = _one_sentence(exc)
    assert "down_blocks.9.attn2" in msg and all(n in msg for n in ca.attention_layers(pipe))


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(pipe, prompt):
    with pytest.raises(MergeStudioError) as exc:
        ca.cross_attention(pipe, prompt, **RUN)
    assert "prompt" in _one_sentence(exc)


def test_loaded_pipeline_without_a_component(pipe):
    from types import SimpleNamespace

    parts = {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(SimpleNamespace(**{**parts, "text_encoder": None}), PROMPT, **RUN)
    assert "text_encoder" in _one_sentence(exc)


def test_bad_folders(folder, tmp_path):
    broken = tmp_path / "no_vae"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(broken, PROMPT, **RUN)
    assert "vae" in _one_sentence(exc) and str(broken) in str(exc.value)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(plain, PROMPT, **RUN)
    assert "model_index.json" in _one_sentence(exc)


# ----------------------------------------------------------------------------- result helpers


def test_overlay_json_and_npz(square, tmp_path):
    assert np.array_equal(square.overlay(0, alpha=0.0), square.image)
    m = square.maps[2].astype(np.float32)
    x = np.clip(m, 0, 1)
    heat = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], -1) * 255
    expected = np.clip(np.rint((1 - 0.7 * x[..., None]) * square.image + 0.7 * x[..., None] * heat), 0, 255)
    assert np.array_equal(square.overlay(2, alpha=0.7), expected.astype(np.uint8))
    with pytest.raises(MergeStudioError):
        square.overlay(len(square.tokens))
    with pytest.raises(MergeStudioError):
        square.overlay(0, alpha=1.5)

    meta = square.to_json()
    assert "maps" not in meta and json.loads(json.dumps(meta)) == meta and meta["tokens"] == square.tokens
    assert np.allclose(np.array(square.to_json(include_maps=True)["maps"]), square.maps)

    path = square.save_npz(tmp_path / "maps.npz")
    assert path == tmp_path / "maps.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["maps.npz"]
    back = ca.CrossAttentionMaps.load_npz(path)
    assert np.array_equal(back.maps, square.maps) and np.array_equal(back.image, square.image)
    assert back.to_json() == meta


def test_a_level_name_stands_for_its_layers(pipe):
    from core.inspect import cross_attention as ca

    names = ca.attention_layers(pipe)
    down = [n for n in names if ca.layer_level(n) == "down"]
    assert down and len(down) < len(names)
    by_level = ca.cross_attention(pipe, "a red cat", steps=2, height=64, width=64, layers=["down"])
    by_name = ca.cross_attention(pipe, "a red cat", steps=2, height=64, width=64, layers=down)
    assert by_level.layers == down
    assert (by_level.maps == by_name.maps).all()


def test_a_pickle_only_pipeline_is_refused(pipe, tmp_path):
    pickled = tmp_path / "pickled"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(str(pickled), safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not (pickled / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(pickled, PROMPT, **RUN)
    message = _one_sentence(exc)
    assert message.startswith(f"{pickled}: cannot be loaded as a Stable Diffusion pipeline (")
    assert f"no diffusion_pytorch_model.safetensors in {pickled}" in message and "pickle" in message
    with pytest.raises(ModelError):
        ca.attention_layers(pickled)


def test_a_folder_under_home_is_written_with_a_tilde(pipe, folder, square, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "m").mkdir(parents=True)
    shutil.copytree(folder, home / "m" / "sd")
    monkeypatch.setenv("HOME", str(home))
    result = ca.cross_attention("~/m/sd", PROMPT, **RUN)
    assert result.pipeline == str(home / "m" / "sd")
    assert np.array_equal(result.maps, square.maps) and np.array_equal(result.image, square.image)
    assert ca.attention_layers("~/m/sd") == ca.attention_layers(pipe)
