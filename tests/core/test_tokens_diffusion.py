"""tomesd and ToDo on diffusers UNets (core/tokens/diffusion.py) against independent references.

References used here, none of them the code under test:

* the unpatched UNet itself: ratio 0, downsample_factor 1 and ``remove()`` must reproduce
  it bit for bit, with the hook tables and attention processors as they were;
* the installed ``tomesd`` package (MIT, a dev-only dependency) patched onto a deep copy
  of the same UNet: same output within a relative error of 1e-3, with the deterministic
  partition and, giving tomesd a generator seeded like ours, with ``use_rand`` too;
* ``r = int(ratio * N)`` and ``1 - 1/(sx*sy)`` written out;
* ToDo's attention written out: ``softmax(q k^T / sqrt(d)) v`` with keys and values from
  the token grid sliced (nearest) or averaged (avg_pool) by hand.

Tiny random UNets (block_out_channels (32, 64)) are built once per session: an SD-like
one (cross-attention at downsample 1 and 2) and an SDXL-like one (no attention at
downsample 1, two transformer layers per block, ``text_time`` added conditioning).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import types

import pytest
import torch

from core.tokens import apply, methods
from core.tokens.api import TokenMergeError
from core.tokens.diffusion import legal_ranges, max_ratio, transformer_levels

diffusers = pytest.importorskip("diffusers")

BATCH = 2
LATENT = 16
TEXT_TOKENS = 7
CROSS = 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these UNets are tiny, and on a shared 2-core machine a second
    OpenMP thread waiting for a busy core turns a 30 ms forward into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet(**config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = dict(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    base.update(config)
    return UNet2DConditionModel(**base).eval()


@pytest.fixture(scope="session")
def sd():
    """SD 1.x-like: transformer blocks at downsample 1 (3 blocks) and 2 (4 blocks, mid included)."""
    return _unet()


@pytest.fixture(scope="session")
def sdxl():
    """SDXL-like: no attention at full resolution, 2 transformer layers per block, text_time conditioning."""
    return _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + CROSS,
        use_linear_projection=True,
    )


def _inputs(batch=BATCH, height=LATENT, width=LATENT, xl=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = {
        "sample": torch.randn(batch, 4, height, width, generator=gen),
        "timestep": 10,
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, CROSS, generator=gen),
    }
    if xl:
        out["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, CROSS, generator=gen),
            "time_ids": torch.randn(batch, 6, generator=gen),
        }
    return out


def _run(unet, inputs):
    inputs = dict(inputs)
    with torch.no_grad():  # the sample positionally: tomesd's pre-hook reads args[0]
        return unet(inputs.pop("sample"), **inputs).sample


def _state(unet):
    """Everything a patch could leave behind: hook tables, instance attributes, processors."""
    tables = (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    modules = {
        name: (tuple(tuple(getattr(m, t, {}).keys()) for t in tables), tuple(sorted(m.__dict__)), type(m))
        for name, m in unet.named_modules()
    }
    processors = {name: id(p) for name, p in unet.attn_processors.items()}
    return modules, processors


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _tomesd(unet, seed=None, **options):
    """The installed tomesd package on a deep copy of ``unet``."""
    tomesd = pytest.importorskip("tomesd")
    twin = copy.deepcopy(unet)
    tomesd.apply_patch(twin, **options)
    if seed is not None:
        # Give tomesd the generator ours uses (it forks the global RNG otherwise).
        twin._tome_info["args"]["generator"] = torch.Generator().manual_seed(seed)
    return twin


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "method, options",
    [("tomesd", {"ratio": 0.0}), ("tomesd", {"ratio": 0.003}), ("todo", {"downsample_factor": 1})],
)
def test_identity_settings_are_bit_exact_and_remove_restores(method, options, sd):
    inputs = _inputs()
    reference = _run(sd, inputs)
    before = _state(sd)
    with apply(sd, method=method, max_downsample=2, **options) as handle:
        assert handle.active and handle.stats["patched_blocks"] == 7
        assert torch.equal(_run(sd, inputs), reference)
        if method == "tomesd":  # int(0.003 * 256) = 0: nothing merges anywhere
            assert handle.stats["tokens_per_layer"] == handle.stats["input_tokens_per_layer"]
    assert not handle.active
    assert _state(sd) == before


def test_remove_restores_exactly_after_merging(sd):
    inputs = _inputs()
    reference = _run(sd, inputs)
    before = _state(sd)
    handle = apply(sd, method="tomesd", ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True)
    assert _state(sd) != before
    merged = _run(sd, inputs)
    assert not torch.equal(merged, reference) and merged.shape == reference.shape
    handle.remove()
    assert _state(sd) == before
    assert torch.equal(_run(sd, inputs), reference)
    handle.remove()  # idempotent


# --------------------------------------------------------------------------- parity with tomesd


@pytest.mark.parametrize(
    "options",
    [
        {"max_downsample": 1},
        {"max_downsample": 2, "ratio": 0.3},
        {"max_downsample": 2, "merge_crossattn": True, "merge_mlp": True},
        {"max_downsample": 2, "sx": 4, "sy": 2, "ratio": 0.8},
    ],
)
def test_matches_installed_tomesd_deterministic(options, sd):
    options = {"ratio": 0.5, **options}
    inputs = _inputs()
    reference = _run(sd, inputs)
    twin = _tomesd(sd, use_rand=False, **options)
    expected = _run(twin, inputs)
    with apply(sd, method="tomesd", use_rand=False, **options):
        got = _run(sd, inputs)
    assert _rel(expected, reference) > 1e-2  # merging does change the output ...
    assert _rel(got, expected) < 1e-3  # ... in the same way as tomesd
    assert _rel(got, expected) < 1e-5  # (measured: about 5e-7, float summation order)


def test_matches_installed_tomesd_on_grids_that_do_not_divide(sd):
    # 14 x 18 latent: 7 x 9 tokens at downsample 2; the last row and column hold no full cell.
    inputs = _inputs(height=14, width=18)
    twin = _tomesd(sd, ratio=0.6, max_downsample=2, use_rand=False)
    with apply(sd, method="tomesd", ratio=0.6, max_downsample=2, use_rand=False) as handle:
        got = _run(sd, inputs)
    assert _rel(got, _run(twin, inputs)) < 1e-3
    assert handle.stats["input_tokens_per_layer"][:2] == [252, 63]


def test_matches_installed_tomesd_with_random_destinations(sd):
    inputs = _inputs()
    twin = _tomesd(sd, seed=7, ratio=0.5, max_downsample=2, use_rand=True, merge_mlp=True)
    with apply(sd, method="tomesd", ratio=0.5, max_downsample=2, use_rand=True, seed=7, merge_mlp=True):
        first = _run(sd, inputs)
        second = _run(sd, inputs)  # the stream moves on, as tomesd's does
    assert _rel(first, _run(twin, inputs)) < 1e-3
    assert _rel(second, _run(twin, inputs)) < 1e-3
    assert not torch.equal(first, second)


def test_sdxl_like_unet_is_patched_at_its_finest_attention_level(sdxl):
    inputs = _inputs(xl=True)
    reference = _run(sdxl, inputs)
    assert transformer_levels(sdxl) == {2: 8}
    # tomesd's default max_downsample=1 silently patches nothing on SDXL ...
    assert torch.equal(_run(_tomesd(sdxl, ratio=0.5, use_rand=False), inputs), reference)
    # ... ours refuses it, and by default picks downsample 2.
    with pytest.raises(TokenMergeError, match=r"max_downsample=1 selects no transformer block.*downsample 2"):
        apply(sdxl, method="tomesd", max_downsample=1)
    twin = _tomesd(sdxl, ratio=0.5, max_downsample=2, use_rand=False)
    with apply(sdxl, method="tomesd", ratio=0.5, use_rand=False) as handle:
        got = _run(sdxl, inputs)
    assert handle.options["max_downsample"] == 2 and handle.stats["patched_blocks"] == 8
    assert handle.stats["tokens_per_layer"] == [32] * 8
    assert _rel(got, _run(twin, inputs)) < 1e-3
    with apply(sdxl, method="todo") as handle:
        assert _run(sdxl, inputs).shape == reference.shape
    assert handle.stats["kv_tokens_per_layer"] == [16] * 8
    assert torch.equal(_run(sdxl, inputs), reference)


# --------------------------------------------------------------------------- counts, stats


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_tokens_per_block_follow_the_ratio(ratio, sd):
    with apply(sd, method="tomesd", ratio=ratio, max_downsample=2) as handle:
        stats = handle.stats
        assert stats["tokens_per_layer"] == [] and stats["merge_seconds"] == 0.0
        _run(sd, _inputs())
        stats = handle.stats
    assert stats["patched_blocks"] == 7 and len(stats["blocks"]) == 7
    assert stats["layer_names"][0] == "down_blocks.0.attentions.0.transformer_blocks.0"
    assert stats["layer_names"][2] == "mid_block.attentions.0.transformer_blocks.0"
    sizes = [256, 64, 64, 64, 64, 256, 256]  # execution order: down 1, 2; mid 2; up 2, 2, 1, 1
    assert stats["input_tokens_per_layer"] == sizes
    assert stats["tokens_per_layer"] == [n - int(ratio * n) for n in sizes]
    assert stats["merge_seconds"] > 0 and stats["batch_size"] == BATCH and stats["latent_size"] == (16, 16)


def test_max_downsample_selects_blocks_by_resolution(sd):
    assert transformer_levels(sd) == {1: 3, 2: 4}
    assert legal_ranges("tomesd", sd)["max_downsample"] == (1, 2)
    with apply(sd, method="tomesd", ratio=0.5) as handle:  # default: the finest level, 1
        _run(sd, _inputs())
    assert handle.options["max_downsample"] == 1 and handle.stats["patched_blocks"] == 3
    assert handle.stats["input_tokens_per_layer"] == [256] * 3


def test_trace_source_keeps_each_blocks_assignment(sd):
    with apply(sd, method="tomesd", ratio=0.5, use_rand=False, trace_source=True) as handle:
        _run(sd, _inputs())
        sources = handle.sources
    assert set(sources) == set(handle.blocks)
    for assignment in sources.values():
        assert assignment.shape == (BATCH, 256) and int(assignment.max()) == 127
        assert torch.equal(assignment.unique(), torch.arange(128))
    with pytest.raises(TokenMergeError, match="nothing to unmerge"):
        handle.unmerge(torch.zeros(BATCH, 128, 32))


# --------------------------------------------------------------------------- randomness


def test_own_generator_leaves_global_rng_alone_and_is_reproducible(sd):
    inputs = _inputs()
    options = {"ratio": 0.5, "max_downsample": 2, "use_rand": True}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with apply(sd, method="tomesd", seed=5, **options) as handle:
        first = _run(sd, inputs)
        assert torch.equal(torch.get_rng_state(), state)
        handle.reseed()
        assert torch.equal(_run(sd, inputs), first)
    torch.manual_seed(999)  # another global state: no influence
    with apply(sd, method="tomesd", seed=5, **options):
        assert torch.equal(_run(sd, inputs), first)
    with apply(sd, method="tomesd", seed=6, **options):
        assert not torch.equal(_run(sd, inputs), first)


def test_odd_batch_with_random_destinations_is_refused(sd):
    inputs = _inputs(batch=3)
    with apply(sd, method="tomesd", ratio=0.5, use_rand=True):
        with pytest.raises(TokenMergeError, match=r"use_rand=True needs an even batch, but this UNet call has batch 3"):
            _run(sd, inputs)
    with apply(sd, method="tomesd", ratio=0.5, use_rand=False) as handle:
        assert _run(sd, inputs).shape[0] == 3
    assert handle.stats["batch_size"] == 3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, named",
    [
        ({"ratio": 0.8}, r"ratio=0.8 is outside \[0, 0.75\]"),
        ({"ratio": 0.9, "sx": 3, "sy": 2}, r"ratio=0.9 is outside \[0, 0.833333\].*sx=3, sy=2"),
        ({"ratio": 0.1, "sx": 1, "sy": 1}, r"ratio=0.1 is outside \[0, 0\]"),
        ({"ratio": -0.1}, "ratio=-0.1"),
        ({"ratio": "half"}, "ratio='half'"),
        ({"sx": 0}, "sx=0"),
        ({"sy": 1.5}, "sy=1.5"),
        ({"max_downsample": 3}, "max_downsample=3 is not a power of two"),
        ({"use_rand": "yes"}, "use_rand"),
        ({"seed": -1}, "seed=-1"),
        ({"r": 4}, "'r' is not an option of method 'tomesd'"),
        ({"merge_attn": False}, "merge_attn, merge_crossattn and merge_mlp are all False"),
    ],
)
def test_bad_tomesd_options_name_the_option_and_leave_the_model_unchanged(options, named, sd):
    inputs = _inputs()
    reference = _run(sd, inputs)
    before = _state(sd)
    with pytest.raises(TokenMergeError, match=named):
        apply(sd, method="tomesd", **options)
    assert _state(sd) == before and torch.equal(_run(sd, inputs), reference)
    # ... and a failed apply over an earlier patch leaves that patch in place.
    with apply(sd, method="tomesd", ratio=0.5, use_rand=False) as handle:
        patched = _run(sd, inputs)
        with pytest.raises(TokenMergeError, match=named):
            apply(sd, method="tomesd", **options)
        assert handle.active and torch.equal(_run(sd, inputs), patched)


def test_legal_ranges_are_computed():
    assert max_ratio(2, 2) == 0.75 and max_ratio(3, 2) == pytest.approx(5 / 6) and max_ratio(1, 1) == 0.0
    assert legal_ranges("tomesd", sx=4, sy=4)["ratio"] == (0.0, 1 - 1 / 16)
    assert legal_ranges("todo")["downsample_method"][0] == "nearest-exact"
    with pytest.raises(TokenMergeError, match="sx=0"):
        max_ratio(0, 2)


def test_the_maximum_ratio_is_accepted(sd):
    with apply(sd, method="tomesd", ratio=max_ratio(3, 2), sx=3, sy=2, max_downsample=2, use_rand=False) as handle:
        _run(sd, _inputs())
    assert handle.stats["tokens_per_layer"][:2] == [256 - int(256 * 5 / 6), 64 - int(64 * 5 / 6)]


@pytest.mark.parametrize(
    "method, options, named",
    [
        ("tomesd", {"sx": 16, "sy": 1, "max_downsample": 2}, r"down_blocks.1.*8x8 token grid.*smaller than one"),
        ("todo", {"downsample_factor": 32}, r"downsample_factor=32 is larger than its 16x16 token grid"),
    ],
)
def test_grids_too_small_for_the_options_are_refused_at_run_time(method, options, named, sd):
    if method == "tomesd":
        options = {**options, "use_rand": False}
    with apply(sd, method=method, **options):
        with pytest.raises(TokenMergeError, match=named):
            _run(sd, _inputs())


def test_unsupported_empty_and_foreign_models_are_refused(sd):
    with pytest.raises(TokenMergeError, match=r"does not support a Linear.*UNet2DConditionModel"):
        apply(torch.nn.Linear(2, 2), method="tomesd")
    with pytest.raises(TokenMergeError, match=r"holds\) a diffusers UNet: use method='tomesd' or method='todo'"):
        apply(sd, method="tome", r=2)
    plain = _unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
    )
    for method in ("tomesd", "todo"):
        with pytest.raises(TokenMergeError, match=f"no transformer blocks.*{method} has nothing to patch"):
            apply(plain, method=method)

    tomesd = pytest.importorskip("tomesd")
    twin = copy.deepcopy(sd)
    inputs = _inputs()
    reference = _run(twin, inputs)
    tomesd.apply_patch(twin, ratio=0.5)
    before = _state(twin)
    with pytest.raises(TokenMergeError, match="already patched by tomesd"):
        apply(twin, method="tomesd")
    with pytest.raises(TokenMergeError, match="already patched by tomesd"):
        apply(twin, method="todo")
    assert _state(twin) == before
    tomesd.remove_patch(twin)  # leaves a stale _tome_info behind, which is fine
    with apply(twin, method="tomesd", ratio=0.0):
        assert torch.equal(_run(twin, inputs), reference)


def _hook_count(unet):
    """How many hooks the UNet's modules hold in all."""
    return sum(len(keys) for tables, _, _ in _state(unet)[0].values() for keys in tables)


def test_pipelines_and_applying_twice_replaces(sd):
    pipeline = types.SimpleNamespace(unet=sd)  # what matters of a DiffusionPipeline: its .unet
    inputs = _inputs()
    before = _state(sd)
    with apply(sd, method="tomesd", ratio=0.3, use_rand=False):
        expected = _run(sd, inputs)
        single = _hook_count(sd)
    handles = []
    try:
        handles.append(apply(pipeline, method="tomesd", ratio=0.5, use_rand=False))
        assert handles[0].model is pipeline and handles[0].unet is sd
        handles.append(apply(pipeline, method="tomesd", ratio=0.3, use_rand=False))
        assert not handles[0].active and handles[1].active
        assert _hook_count(sd) == single
        assert torch.equal(_run(sd, inputs), expected)
        handles.append(apply(sd, method="todo"))  # another method replaces it too
        assert not handles[1].active and handles[2].active
    finally:
        for handle in handles:
            handle.remove()
    assert _state(sd) == before


def test_a_real_pipeline_with_guidance(sd):
    """StableDiffusionPipeline end to end (text encoder bypassed with prompt embeddings)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=sd,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, TEXT_TOKENS, CROSS, generator=gen)
    negative = torch.randn(1, TEXT_TOKENS, CROSS, generator=gen)

    def generate(**options):
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=2,
            height=LATENT,
            width=LATENT,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **options,
        ).images

    reference = generate()
    with apply(pipe, method="tomesd", ratio=0.5, seed=1) as handle:
        state = torch.get_rng_state()
        first = generate()
        assert torch.equal(torch.get_rng_state(), state)
        assert handle.stats["batch_size"] == 2  # [unconditional, conditional]
        handle.reseed()
        assert torch.equal(generate(), first)  # same seeds, same image
        assert not torch.equal(first, reference)
        with pytest.raises(TokenMergeError, match="even batch"):
            generate(guidance_scale=1.0)  # no guidance: batch 1
    with apply(pipe, method="todo"):
        assert generate().shape == reference.shape
    assert torch.equal(generate(), reference)


# --------------------------------------------------------------------------- ToDo


def _reference_attention(attn, x, kv):
    """softmax(q k^T / sqrt(d)) v with q from x and k, v from kv, written out."""
    batch, tokens, _ = x.shape
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(kv), attn.to_v(kv)
    dim = q.shape[-1] // heads

    def split(t):
        return t.reshape(batch, -1, heads, dim).transpose(1, 2)

    weights = (split(q) @ split(k).transpose(-1, -2) * dim**-0.5).softmax(-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(batch, tokens, heads * dim)
    return attn.to_out[0](out)


@pytest.mark.parametrize("factor, mode", [(2, "nearest-exact"), (4, "nearest-exact"), (2, "avg_pool")])
def test_todo_downsamples_keys_and_values_only(factor, mode, sd):
    inputs = _inputs()
    reference = _run(sd, inputs)
    block = sd.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}
    hooks = [
        block.attn1.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0]), with_kwargs=True, prepend=True),
        block.attn1.register_forward_hook(lambda m, a, o: seen.update(out=o)),
        block.attn1.to_k.register_forward_hook(lambda m, a, o: seen.update(k_tokens=a[0].shape[1])),
        block.attn1.to_v.register_forward_hook(lambda m, a, o: seen.update(v_tokens=a[0].shape[1])),
        block.attn1.to_q.register_forward_hook(lambda m, a, o: seen.update(q_tokens=a[0].shape[1])),
    ]
    try:
        with apply(sd, method="todo", downsample_factor=factor, downsample_method=mode) as handle:
            out = _run(sd, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == reference.shape and not torch.equal(out, reference)
    n = LATENT * LATENT
    assert seen["q_tokens"] == n and seen["k_tokens"] == seen["v_tokens"] == n // factor**2
    stats = handle.stats
    assert stats["patched_blocks"] == 3 and stats["tokens_per_layer"] == [n] * 3
    assert stats["kv_tokens_per_layer"] == [n // factor**2] * 3
    x = seen["x"]
    grid = x.reshape(BATCH, LATENT, LATENT, -1)
    if mode == "avg_pool":
        small = grid.reshape(BATCH, LATENT // factor, factor, LATENT // factor, factor, -1).mean((2, 4))
    else:  # nearest-exact: the token at the centre of each factor x factor cell
        small = grid[:, factor // 2 :: factor, factor // 2 :: factor]
    with torch.no_grad():
        expected = _reference_attention(block.attn1, x, small.reshape(BATCH, -1, x.shape[-1]))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(_run(sd, inputs), reference)


def test_bad_todo_options(sd):
    for options, named in [
        ({"downsample_factor": 0}, "downsample_factor=0"),
        ({"downsample_method": "lanczos"}, "downsample_method='lanczos'"),
        ({"ratio": 0.5}, "'ratio' is not an option of method 'todo'"),
    ]:
        with pytest.raises(TokenMergeError, match=named):
            apply(sd, method="todo", **options)


# --------------------------------------------------------------------------- registry, imports


def test_methods_list_the_diffusion_methods():
    listed = {m["name"]: m for m in methods()}
    tomesd, todo = listed["tomesd"], listed["todo"]
    assert tomesd["paper"] == "https://arxiv.org/abs/2303.17604" and todo["paper"] == "https://arxiv.org/abs/2402.13573"
    assert "UNet2DConditionModel" in tomesd["targets"] and "BertModel" not in tomesd["targets"]
    params = {p["name"]: p for p in tomesd["parameters"]}
    assert set(params) == {
        "ratio", "max_downsample", "sx", "sy", "use_rand", "seed",
        "merge_attn", "merge_crossattn", "merge_mlp", "trace_source",
    }
    assert params["ratio"]["range"] == [0.0, 0.75] and params["max_downsample"]["choices"] == [1, 2, 4, 8]
    assert params["use_rand"]["default"] is True and params["merge_crossattn"]["default"] is False
    assert {p["name"] for p in todo["parameters"]} == {"downsample_factor", "max_downsample", "downsample_method"}
    for method in (tomesd, todo):
        for p in method["parameters"]:
            assert p["type"] in {"int", "float", "bool", "choice", "r"} and p["help"]


def test_importing_the_diffusion_module_is_cheap():
    code = (
        "import sys, core.tokens, core.tokens.diffusion; core.tokens.methods(); "
        "core.tokens.diffusion.legal_ranges('tomesd', sx=3, sy=3); "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or result.stdout
