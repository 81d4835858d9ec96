"""core.inspect.weights: figures against a direct computation on full state dicts, skips, streaming."""

from __future__ import annotations

import json
import math
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.errors import CancelledError, MergeStudioError
from core.inspect import weights as wd
from core.io.formats import ModelSource
from core.jobs import CancelToken, drive
from tests.fixtures.tiny_models import make_base, make_missing_tensor, read_state_dict

LLAMA_MODULES = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}


# ----------------------------------------------------------------------------- reference


def reference_figures(ref: torch.Tensor, xs: list[torch.Tensor]) -> dict:
    """The figures written out directly (float64, sort instead of selection, stacked signs)."""
    r = ref.double()
    ds = [x.double() - r for x in xs]
    rel = [float(d.norm() / r.norm()) for d in ds]
    top = []
    for d in ds:
        a = d.abs().flatten().sort(descending=True).values
        k = math.ceil(0.1 * a.numel())
        top.append(float(a[:k].sum() / a.sum()))
    out = {"rel_l2": rel, "abs_l2": [float(d.norm()) for d in ds], "top10_share": top}
    if len(ds) >= 2:
        out["cosine"] = [[float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                          for b in ds] for a in ds]
        signs = torch.stack([d.sign() for d in ds])  # [M, ...]
        eligible = (signs != 0).sum(0) >= 2
        disagree = (signs == 1).any(0) & (signs == -1).any(0)
        out["sign_conflict"] = float((eligible & disagree).sum() / eligible.sum())
    return out


@pytest.fixture(scope="module")
def states(llama_family):
    return {k: read_state_dict(v) for k, v in llama_family.items()}


@pytest.fixture(scope="module")
def diff_ab(llama_family):
    return wd.weight_diff([llama_family["a"], llama_family["b"]], base=llama_family["base"])


# ----------------------------------------------------------------------------- figures


def test_figures_equal_direct_computation(diff_ab, states, llama_family):
    assert diff_ab.reference == str(llama_family["base"])
    assert diff_ab.compared == [str(llama_family["a"]), str(llama_family["b"])]
    assert diff_ab.skipped == []
    assert {t.name for t in diff_ab.tensors} == set(states["base"])
    for t in diff_ab.tensors:
        ref = states["base"][t.name]
        expected = reference_figures(ref, [states["a"][t.name], states["b"][t.name]])
        assert t.shape == tuple(ref.shape) and t.numel == ref.numel()
        for key in ("rel_l2", "abs_l2", "top10_share"):
            assert getattr(t, key) == pytest.approx(expected[key], rel=1e-9), (t.name, key)
        for row, exp_row in zip(t.cosine, expected["cosine"]):
            assert row == pytest.approx(exp_row, rel=1e-9, abs=1e-12), t.name
        assert t.sign_conflict == pytest.approx(expected["sign_conflict"], rel=1e-12), t.name
    # The fixture's deltas are ~2 % of the weights' std, with a few 10x outliers.
    q = next(t for t in diff_ab.tensors if t.name == "model.layers.1.self_attn.q_proj.weight")
    assert q.layer == 1 and q.module == "self_attn.q_proj.weight"
    assert 0.005 < q.rel_l2[0] < 0.1
    assert 0.1 < q.top10_share[0] < 1.0
    embed = next(t for t in diff_ab.tensors if t.name == "model.embed_tokens.weight")
    assert embed.layer is None and embed.module == "model.embed_tokens.weight"


def test_without_base_the_first_model_is_the_reference(diff_ab, llama_family):
    fam = llama_family
    plain = wd.weight_diff([fam["base"], fam["a"], fam["b"]])
    assert plain.base is None and plain.reference == str(fam["base"])
    assert plain.compared == [str(fam["a"]), str(fam["b"])]
    for t, u in zip(plain.tensors, diff_ab.tensors):
        assert (t.name, t.rel_l2, t.top10_share, t.cosine, t.sign_conflict) == (
            u.name, u.rel_l2, u.top10_share, u.cosine, u.sign_conflict)
    single = wd.weight_diff([fam["base"], fam["a"]])
    assert all(t.cosine is None and t.sign_conflict is None and len(t.rel_l2) == 1 for t in single.tensors)
    assert np.isnan(single.heatmap("sign_conflict")[0]).all()


def test_three_task_vectors_sign_conflict(states, llama_family):
    fam = llama_family
    three = wd.weight_diff([fam["a"], fam["b"], fam["c"]], base=fam["base"])
    for t in three.tensors[:6]:
        expected = reference_figures(states["base"][t.name], [states[v][t.name] for v in "abc"])
        assert t.sign_conflict == pytest.approx(expected["sign_conflict"], rel=1e-12)
        assert len(t.cosine) == 3 and t.cosine[0][0] == 1.0


def test_tensor_figures_by_hand():
    ref = torch.zeros(4, dtype=torch.float64)
    d1 = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    d2 = torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    d3 = torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    from core.inspect import chunked

    f = chunked.figures(ref, [ref + d for d in (d1, d2, d3)], torch.float64)
    # entry 0: three non-zero, signs disagree; entry 3: two non-zero, agree; 1 and 2: < 2 non-zero.
    assert f["sign_conflict"] == 0.5
    assert f["abs_l2"] == pytest.approx([math.sqrt(6), math.sqrt(10), 1.0])
    assert all(math.isnan(v) for v in f["rel_l2"])  # reference all zeros: undefined, not a warning
    # top 10 % of 4 entries = ceil(0.4) = 1 entry.
    assert f["top10_share"] == pytest.approx([2 / 4, 3 / 4, 1.0])
    # Ties: 11 equal entries, k = ceil(1.1) = 2 of them.
    ones, zeros = torch.ones(11, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    assert chunked.top_share_chunked(lambda a, b: ones[a:b], 11, 11.0, 1.0) == pytest.approx(2 / 11)
    assert chunked.top_share_chunked(lambda a, b: zeros[a:b], 7, 0.0, 0.0) == 0.0


def test_identical_models_give_zeros(llama_family):
    base = llama_family["base"]
    same = wd.weight_diff([base, base], base=base)
    for t in same.tensors:
        assert t.rel_l2 == [0.0, 0.0] and t.abs_l2 == [0.0, 0.0]
        assert t.top10_share == [0.0, 0.0]
        assert t.cosine == [[0.0, 0.0], [0.0, 0.0]]
        assert t.sign_conflict == 0.0
    values, layers, modules = same.heatmap("rel_l2")
    assert values.shape == (4, 9) and (values == 0).all()
    json.dumps(same.to_json(), allow_nan=False)


# ----------------------------------------------------------------------------- views


def test_heatmap_per_layer_cell_and_json(diff_ab):
    values, layers, modules = diff_ab.heatmap("rel_l2", model=1)
    assert layers == [0, 1, 2, 3] and set(modules) == LLAMA_MODULES
    assert values.shape == (4, 9) and not np.isnan(values).any()
    for i, layer in enumerate(layers):
        for j, module in enumerate(modules):
            cell = diff_ab.cell(layer, module)
            assert cell.name == f"model.layers.{layer}.{module}"
            assert values[i, j] == cell.rel_l2[1]
    cos, _, _ = diff_ab.heatmap("cosine")
    pair, _, _ = diff_ab.heatmap("cosine", pair=(0, 1))
    assert (cos == pair).all()
    assert cos[0, 0] == diff_ab.cell(0, modules[0]).cosine[0][1]
    sc, _, _ = diff_ab.heatmap("sign_conflict")
    assert sc[2, 3] == diff_ab.cell(2, modules[3]).sign_conflict
    assert diff_ab.cell(7, modules[0]) is None
    for layer, value in diff_ab.per_layer("top10_share", model=0):
        cells = [t for t in diff_ab.tensors if t.layer == layer]
        expected = sum(t.top10_share[0] * t.numel for t in cells) / sum(t.numel for t in cells)
        assert value == pytest.approx(expected, rel=1e-12)
    with pytest.raises(MergeStudioError, match="bogus"):
        diff_ab.heatmap("bogus")
    with pytest.raises(MergeStudioError, match="index 2"):
        diff_ab.heatmap("rel_l2", model=2)
    data = json.loads(json.dumps(diff_ab.to_json(), allow_nan=False))
    assert len(data["tensors"]) == len(diff_ab.tensors) and data["layers"] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- skips and errors


def test_shape_and_missing_tensors_are_reported(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights_bad")
    other_vocab = make_base(root / "vocab300", arch="llama", vocab=300, tokenizer=False)
    missing = make_missing_tensor(llama_family["base"], root / "missing")
    result = wd.weight_diff([llama_family["a"], other_vocab, missing.path], base=llama_family["base"])
    reasons = dict(result.skipped)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert name in reasons and name not in {t.name for t in result.tensors}
        assert reasons[name].startswith("different vocabularies: [256, 64]")
        assert "[300, 64]" in reasons[name] and str(other_vocab) in reasons[name]
    assert reasons[missing.tensor] == f"missing in {missing.path}"
    assert len(result.tensors) == len(read_state_dict(llama_family["base"])) - 3
    values, layers, modules = result.heatmap("rel_l2", model=2)
    layer = int(missing.tensor.split(".")[2])
    module = missing.tensor.split(".", 3)[3]
    nan_cells = [(layers[i], modules[j]) for i in range(len(layers)) for j in range(len(modules))
                 if math.isnan(values[i, j])]
    assert nan_cells == [(layer, module)]
    assert result.cell(layer, module) is None
    # The other way round: a tensor the reference lacks is reported too.
    flipped = wd.weight_diff([missing.path, llama_family["a"]])
    assert dict(flipped.skipped)[missing.tensor] == (
        f"not in the reference {missing.path}; only in {llama_family['a']}")


def test_errors_name_the_folders(llama_family, tmp_path):
    with pytest.raises(MergeStudioError, match="two models") as err:
        wd.weight_diff([llama_family["a"]])
    assert str(llama_family["a"]) in str(err.value)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(unrelated))
    with pytest.raises(MergeStudioError, match="no tensor names in common") as err:
        wd.weight_diff([llama_family["base"], unrelated])
    assert str(llama_family["base"]) in str(err.value) and str(unrelated) in str(err.value)


# ----------------------------------------------------------------------------- streaming


def test_streams_one_tensor_per_model(llama_family, monkeypatch):
    original = ModelSource.get
    alive: dict[str, list[weakref.ref]] = {}
    reads: list[tuple[str, str]] = []
    peak = {"per_model": 0, "total": 0}

    def tracked_get(self, name):
        tensor = original(self, name)
        refs = [r for r in alive.get(str(self.path), []) if r() is not None] + [weakref.ref(tensor)]
        alive[str(self.path)] = refs
        reads.append((str(self.path), name))
        peak["per_model"] = max(peak["per_model"], len(refs))
        peak["total"] = max(peak["total"], sum(1 for rs in alive.values() for r in rs if r() is not None))
        return tensor

    monkeypatch.setattr(ModelSource, "get", tracked_get)
    fam = llama_family
    progress = []
    result = wd.weight_diff([fam["a"], fam["b"]], base=fam["base"], on_progress=progress.append)
    assert peak["per_model"] == 1  # the previous tensor of that model was gone before the next read
    assert peak["total"] <= 3  # base, a, b: one each at most
    assert len(reads) == len(set(reads)) == 3 * len(result.tensors)  # each tensor read once per model
    expected_bytes = 3 * sum(t.numel * 4 for t in result.tensors)  # float32
    assert progress[0].done == 0 and progress[0].bytes_total == expected_bytes
    assert progress[-1].done == progress[-1].total == len(result.tensors)
    assert progress[-1].bytes_done == expected_bytes
    assert all(b.bytes_done >= a.bytes_done for a, b in zip(progress, progress[1:]))


def test_cancel_closes_the_models(llama_family, monkeypatch):
    closed = []
    original = ModelSource.close
    monkeypatch.setattr(ModelSource, "close", lambda self: (closed.append(str(self.path)), original(self)))
    token = CancelToken()

    def stop_after_three(p):
        if p.done == 3:
            token.cancel()

    fam = llama_family
    with pytest.raises(CancelledError):
        drive(wd.iter_weight_diff([fam["a"], fam["b"]], base=fam["base"]), stop_after_three, token)
    assert sorted(closed) == sorted(str(fam[k]) for k in ("base", "a", "b"))
