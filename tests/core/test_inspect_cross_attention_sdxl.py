"""Cross-attention maps (DAAM) on a tiny complete StableDiffusionXLPipeline.

References are written out or taken from diffusers itself: the probabilities from the
layer's own to_q / to_k weights applied to hidden states caught by forward pre-hooks,
the text embeddings from the pipeline's own ``encode_prompt`` (window by window for a
long prompt), and the image from a plain pipeline call without any capture.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import CancelledError, MergeStudioError, ModelError
from core.inspect import cross_attention as ca
from core.jobs import CancelToken, drive
from tests.fixtures.tiny_pipelines import clip_vocabulary, make_sdxl_generation_pipeline

PROMPT = "a red cat on a blue house, painting"
HEAD = " ".join(["a photo of the red cat"] * 12 + ["a red cat"])  # exactly 75 tokens: one full window
TAIL = "on a blue house, painting"
LONG = f"{HEAD} {TAIL}"
NEG = "green tree"
RUN = dict(steps=2, height=64, width=64, seed=3)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sdxl_generation_pipeline(tmp_path_factory.mktemp("xl") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionXLPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def square(pipe):
    return ca.cross_attention(pipe, PROMPT, **RUN)


def _ids(tok, text):
    """The tokenizer's own ids (with __call__), minus start/end/pad."""
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return [i for i in tok(text, truncation=False).input_ids if i not in special]


def _processors(pipe):
    return {name: m.processor for name, m in pipe.unet.named_modules() if hasattr(m, "set_processor")}


def _encode(pipe, text):
    """diffusers' own SDXL encoding of one prompt: (embeds [1, 77, 48], pooled [1, 32])."""
    embeds, _, pooled, _ = pipe.encode_prompt(text, device=CPU, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def _direct(attn, hs, ehs, heads=None, cond=1):
    """softmax(Q K^T / sqrt(d)) for the conditional half, written out: [heads, N, S]."""
    assert attn.to_q.bias is None and attn.to_k.bias is None
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


class _Hooks:
    """Forward pre-hooks that keep (hidden_states, encoder_hidden_states) of attn2 layers and the UNet's inputs."""

    def __init__(self, pipe, names):
        modules = dict(pipe.unet.named_modules())
        self.calls = {n: [] for n in names}
        self.unet_calls = []
        self.handles = [modules[n].register_forward_pre_hook(self._layer(n), with_kwargs=True) for n in names]
        self.handles.append(pipe.unet.register_forward_pre_hook(self._unet, with_kwargs=True))

    def _layer(self, name):
        def pre(module, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            self.calls[name].append((hs.detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))
        return pre

    def _unet(self, module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        self.unet_calls.append((kwargs["encoder_hidden_states"].detach().clone(),
                                added["text_embeds"].detach().clone()))

    def clear(self):
        for c in self.calls.values():
            c.clear()
        self.unet_calls.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _unnormalised(result):
    return torch.from_numpy(result.maps) * torch.tensor(result.raw_max)[:, None, None]


# ----------------------------------------------------------------------------- shapes and tokens


def test_one_map_per_prompt_token(pipe, square):
    ids = _ids(pipe.tokenizer, PROMPT)
    assert len(square.tokens) == len(ids) == 9
    assert square.tokens == [pipe.tokenizer.decode([i]).strip() for i in ids]
    assert square.maps.shape == (len(ids), 64, 64) and square.maps.dtype == np.float32
    assert square.token_chunks == [0] * len(ids) and square.chunks == 1
    assert square.image.shape == (64, 64, 3) and square.image.dtype == np.uint8
    assert np.allclose(square.maps.reshape(len(ids), -1).max(axis=1), 1.0, atol=1e-6) and square.maps.min() >= 0
    assert len(square.raw_max) == len(ids) and all(v > 0 for v in square.raw_max)
    assert square.timesteps == [0, 1] and square.heads == "all"
    assert square.layers == ca.attention_layers(pipe)
    # the fixture's two tokenizers split alike, so there is no note about tokenizer_2
    assert not any("tokenizer_2" in n for n in square.notes)
    assert any("force_zeros_for_empty_prompt" in n for n in square.notes)


def test_attention_layers(pipe, folder):
    names = ca.attention_layers(pipe)
    expected = [n for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    assert sorted(names) == sorted(expected) and len(names) == 11  # 1 + 2 down, 2 mid, 4 + 2 up
    levels = [ca.layer_level(n) for n in names]
    assert levels == sorted(levels, key=ca.LEVELS.index) and set(levels) == {"down", "mid", "up"}
    assert ca.attention_layers(folder) == names


def test_window_encoding_matches_pipeline_encoding(pipe):
    """One window through both encoders equals diffusers' SDXL encode_prompt, embeddings and pooled."""
    chunks = [pipe.tokenizer(PROMPT, padding="max_length", max_length=77).input_ids]
    chunks_2 = [pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77).input_ids]
    t, t2 = pipe.tokenizer, pipe.tokenizer_2
    assert chunks == ca.chunk_token_ids(_ids(t, PROMPT), t.bos_token_id, t.eos_token_id, t.pad_token_id)
    assert chunks_2 == ca.chunk_token_ids(_ids(t2, PROMPT), t2.bos_token_id, t2.eos_token_id, t2.pad_token_id)
    embeds, pooled = ca.encode_chunks_sdxl(pipe, chunks, chunks_2)
    ref_embeds, ref_pooled = _encode(pipe, PROMPT)
    assert embeds.shape == (1, 77, 48) and pooled.shape == (1, 32)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


# ----------------------------------------------------------------------------- numerics


def test_capture_leaves_the_image_unchanged(pipe):
    before = _processors(pipe)

    def plain():  # no negative_prompt: SDXL's zero unconditional embeddings
        out = pipe(PROMPT, num_inference_steps=RUN["steps"], height=64, width=64, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(RUN["seed"]), output_type="np")
        return out.images[0]

    reference = plain()
    scale = pipe.vae_scale_factor
    with ca.CrossAttentionRecorder(pipe.unet, 64 // scale, 64 // scale) as rec:
        assert all(isinstance(m.processor, ca._CaptureProcessor) for m in rec.modules.values())
        captured = plain()
    assert set(rec.recorder.sums) == {(16, 16), (8, 8)}  # both cross-attention resolutions captured
    assert np.abs(captured - reference).max() <= 1e-5
    assert _processors(pipe) == before
    r = ca.cross_attention(pipe, PROMPT, **RUN)
    assert np.array_equal(r.image, np.clip(np.rint(reference * 255), 0, 255).astype(np.uint8))
    assert _processors(pipe) == before


def test_probabilities_equal_direct_computation_non_square(pipe):
    """Maps for chosen layers/steps/heads equal the formula on hooked hidden states, at 64 x 96."""
    names = ca.attention_layers(pipe)
    low, deep = names[0], names[1]  # down_blocks.1 (4 heads, 16 x 24 grid), down_blocks.2 (8 heads, 8 x 12)
    modules = dict(pipe.unet.named_modules())
    assert (modules[low].heads, modules[deep].heads) == (4, 8)
    with _Hooks(pipe, [low, deep]) as hooks:
        one = ca.cross_attention(pipe, PROMPT, steps=2, height=64, width=96, seed=1, layers=[deep], timesteps=[1],
                                 heads=[0, 5])
        hooks.clear()
        both = ca.cross_attention(pipe, PROMPT, steps=2, height=64, width=96, seed=1, layers=[low, deep])
    T = len(one.tokens)
    assert one.maps.shape == (T, 64, 96) and one.image.shape == (64, 96, 3) and (one.height, one.width) == (64, 96)
    positions = list(range(1, T + 1))
    grids = {low: (16, 24), deep: (8, 12)}  # latent 32 x 48 (VAE factor 2), halved twice
    assert all(len(c) == 2 for c in hooks.calls.values())  # one call per step
    # the UNet was given the pipeline's own encoding of the prompt, zeros for the empty negative
    ref_embeds, ref_pooled = _encode(pipe, PROMPT)
    for ehs, pooled in hooks.unet_calls:
        torch.testing.assert_close(ehs[1:], ref_embeds, rtol=0, atol=0)
        torch.testing.assert_close(pooled[1:], ref_pooled, rtol=0, atol=0)
        assert not ehs[:1].any() and not pooled[:1].any()

    hs, ehs = hooks.calls[deep][1]  # same seed -> the same hidden states as in the first run
    expected = _as_map(_direct(modules[deep], hs, ehs, heads=[0, 5]), grids[deep], positions, (64, 96))
    torch.testing.assert_close(_unnormalised(one), expected, rtol=1e-4, atol=1e-5)
    assert one.timesteps == [1] and one.layers == [deep] and one.heads == "0,5"

    expected = sum(_as_map(_direct(modules[n], hs, ehs), grids[n], positions, (64, 96))
                   for n in (low, deep) for hs, ehs in hooks.calls[n])
    torch.testing.assert_close(_unnormalised(both), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(both.raw_max), expected.flatten(1).amax(1), rtol=1e-5, atol=1e-6)


def test_long_prompt_is_encoded_window_by_window(pipe):
    """> 75 tokens: both encoders per window, windows concatenated, pooled from window 0 of text_encoder_2."""
    head, tail = _ids(pipe.tokenizer, HEAD), _ids(pipe.tokenizer, TAIL)
    assert len(head) == 75 and _ids(pipe.tokenizer, LONG) == head + tail
    layer = ca.attention_layers(pipe)[0]
    module = dict(pipe.unet.named_modules())[layer]
    with _Hooks(pipe, [layer]) as hooks:
        r = ca.cross_attention(pipe, LONG, **RUN, layers=[layer])
        zero_calls = list(hooks.unet_calls)
        hooks.clear()
        neg = ca.cross_attention(pipe, LONG, **RUN, negative_prompt=NEG, layers=[layer])
    n = len(head) + len(tail)
    assert r.chunks == 2 and len(r.tokens) == n and r.maps.shape == (n, 64, 64)
    assert r.token_chunks == [0] * 75 + [1] * len(tail)
    assert any("75-token windows" in note for note in r.notes)

    # the text side, against diffusers' encode_prompt of each window's text
    (e_head, p_head), (e_tail, _) = _encode(pipe, HEAD), _encode(pipe, TAIL)
    expected = torch.cat([e_head, e_tail], dim=1)  # [1, 154, 48]
    for ehs, pooled in zero_calls:
        assert ehs.shape == (2, 154, 48)
        torch.testing.assert_close(ehs[1:], expected, rtol=0, atol=0)
        torch.testing.assert_close(pooled[1:], p_head, rtol=0, atol=0)
        assert not ehs[:1].any() and not pooled[:1].any()  # force_zeros_for_empty_prompt
    (e_neg, p_neg), (e_empty, _) = _encode(pipe, NEG), _encode(pipe, "")
    for ehs, pooled in hooks.unet_calls:
        torch.testing.assert_close(ehs[:1], torch.cat([e_neg, e_empty], dim=1), rtol=0, atol=0)
        torch.testing.assert_close(pooled[:1], p_neg, rtol=0, atol=0)
        torch.testing.assert_close(ehs[1:], expected, rtol=0, atol=0)
    assert any("padded with 1 empty window" in note for note in neg.notes)

    # the maps: token j of window c at 77 * c + 1 + j over the 154 positions
    positions = list(range(1, 76)) + [77 + 1 + j for j in range(len(tail))]
    want = sum(_as_map(_direct(module, hs, ehs), (16, 16), positions, (64, 64)) for hs, ehs in hooks.calls[layer])
    torch.testing.assert_close(_unnormalised(neg), want, rtol=1e-4, atol=1e-5)


def test_a_level_and_its_heads(pipe):
    mid = [n for n in ca.attention_layers(pipe) if ca.layer_level(n) == "mid"]
    assert len(mid) == 2
    r = ca.cross_attention(pipe, "a red cat", **RUN, layers=["mid"], heads=[7])  # mid layers have 8 heads
    assert r.layers == mid and r.heads == "7"
    with pytest.raises(MergeStudioError) as exc:  # every layer: the level-1 ones have 4 heads
        ca.cross_attention(pipe, "a red cat", **RUN, heads=[4])
    assert "0..3" in _one_sentence(exc)


def test_second_tokenizer_splitting_differently_is_noted(pipe, tmp_path):
    """tokens come from tokenizer; a tokenizer_2 with fewer BPE merges is reported in a note."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m for m in merges if m != "c a") + "\n",
                                         encoding="utf-8")
    # same vocabulary and ids as the fixture's, but "cat" no longer merges into one token
    tok_b = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77,
                          pad_token="<|endoftext|>")
    assert len(tok_b) == len(pipe.tokenizer)
    assert len(_ids(tok_b, PROMPT)) > len(_ids(pipe.tokenizer, PROMPT))
    other = StableDiffusionXLPipeline(**{**pipe.components, "tokenizer_2": tok_b})
    other.set_progress_bar_config(disable=True)
    before = _processors(pipe)
    r = ca.cross_attention(other, PROMPT, **RUN)
    ids = _ids(pipe.tokenizer, PROMPT)
    assert r.tokens == [pipe.tokenizer.decode([i]).strip() for i in ids] and r.maps.shape[0] == len(ids)
    assert any(f"tokenizer_2 splits the prompt into {len(_ids(tok_b, PROMPT))} tokens and tokenizer into "
               f"{len(ids)}" in n for n in r.notes)
    assert _processors(pipe) == before


# ----------------------------------------------------------------------------- jobs and clean-up


def test_progress_folder_and_restored_processors(pipe, folder, square):
    before = _processors(pipe)
    seen = []
    r = drive(ca.iter_cross_attention(pipe, PROMPT, **RUN), on_progress=seen.append)
    assert [p.done for p in seen] == [0, 1, 2, 3] and all(p.total == 3 for p in seen)
    assert np.array_equal(r.maps, square.maps) and np.array_equal(r.image, square.image)
    assert _processors(pipe) == before
    r2 = ca.cross_attention(folder, PROMPT, **RUN)  # from the folder: same pipeline, same result
    assert r2.pipeline == str(folder) and np.array_equal(r2.maps, r.maps) and np.array_equal(r2.image, r.image)


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

    gen = ca.iter_cross_attention(pipe, LONG, steps=5, height=64, width=64)  # the embeddings path too
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


def test_missing_second_encoder_is_named(pipe, folder, tmp_path):
    parts = {name: getattr(pipe, name) for name in ca.SDXL_COMPONENTS}
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(SimpleNamespace(**{**parts, "text_encoder_2": None}), PROMPT, **RUN)
    assert "text_encoder_2" in _one_sentence(exc)
    broken = tmp_path / "no_tok2"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(broken, PROMPT, **RUN)
    assert "tokenizer_2" in _one_sentence(exc) and str(broken) in str(exc.value)


def test_other_pipeline_classes_are_refused(folder, tmp_path):
    other = tmp_path / "img2img"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as exc:
        ca.cross_attention(other, PROMPT, **RUN)
    msg = _one_sentence(exc)
    assert "StableDiffusionXLImg2ImgPipeline" in msg and "StableDiffusionXLPipeline" in msg
