"""WIDEN and Metrics-Weighted Averaging, each checked against its formula written out here.

The references below re-derive both methods step by step in float64 (column by
column, in plain Python where it reads better), independently of the kernels;
the kernels compute in float32, so comparisons allow float32 rounding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import core.merge as merge
from core.cli import main
from core.errors import RecipeError
from core.merge import methods
from core.merge.document import RecipeDocument
from core.merge.methods.base import BASE_IGNORED, BASE_REQUIRED, GLOBAL, MODEL, TensorInputs
from tests.fixtures.tiny_models import read_state_dict

TENSOR = "model.layers.0.mlp.down_proj.weight"
EMBEDDING = "model.embed_tokens.weight"


# -- helpers ------------------------------------------------------------------


def rand(*shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def changed(base: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """``base`` plus a random change of relative size ``scale``."""
    return base + scale * rand(*base.shape, seed=seed)


def kernel(name: str, tensors: list, base_index=None, model_params=None, tensor=TENSOR, **params: Any):
    """Run a method's kernel as the planner binds it: defaults filled in, its check run."""
    method = methods.get(name)
    bound = {p.name: params.get(p.name, p.default) for p in method.global_parameters}
    given = model_params or [{}] * len(tensors)
    per_model = [{p.name: g.get(p.name, p.default) for p in method.model_parameters} for g in given]
    if method.check is not None:
        method.check(tensor, bound, per_model, base_index)
    copies = [t.clone() for t in tensors]
    inputs = TensorInputs(tensor, list(tensors), base_index, bound, per_model, [f"/m/{i}" for i in range(len(tensors))])
    out = method.kernel(inputs)
    for before, after in zip(copies, tensors):
        assert torch.equal(before, after), f"{name} changed an input tensor in place"
    return out


def widen(base, models, tensor=TENSOR, **params):
    """Our WIDEN kernel with the base last (where the planner puts an unlisted base)."""
    return kernel("widen", [*models, base], base_index=len(models), tensor=tensor, **params)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 2e-6) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.double().abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= rel * scale + 1e-12, f"max diff {diff:.3g} vs max |ref| {scale:.3g}"


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- WIDEN, written out ---------------------------------------------------------


def ranks(values: list[float]) -> list[float]:
    """Each value's rank among ``values``: how many are strictly smaller, over k - 1."""
    k = len(values)
    if k == 1:
        return [0.0]
    return [sum(other < v for other in values) / (k - 1) for v in values]


def scores(divergences: list[list[float]], t: float, s: float, tau: float) -> list[list[float]]:
    """divergences[n][j] -> importance[n][j]: rank per model, softmax over models, calibration."""
    n_models, k = len(divergences), len(divergences[0])
    r = [ranks(row) for row in divergences]
    out = [[0.0] * k for _ in range(n_models)]
    for j in range(k):
        e = [math.exp(r[n][j] / tau) for n in range(n_models)]
        for n in range(n_models):
            score = e[n] / sum(e)
            out[n][j] = s if score > t / n_models else score
    return out


def unit(column: torch.Tensor) -> torch.Tensor:
    norm = column.norm().item()
    return column / norm if norm > 0 else torch.zeros_like(column)


def reference_widen(base, models, *, t=1.0, s=1.0, tau=1.0, embedding=False):
    """WIDEN of ``models`` into ``base``, column by column in float64."""
    B = base.double()
    Ws = [w.double() for w in models]
    if B.dim() < 2:
        return reference_widen_elements(B, Ws, t, s, tau).to(base.dtype)
    if embedding:  # one column per token
        B, Ws = B.T, [w.T for w in Ws]
    rows = B.shape[0]
    B, Ws = B.reshape(rows, -1), [w.reshape(rows, -1) for w in Ws]
    k = B.shape[1]
    # 1. magnitude (column norm) and direction (unit column) of base and models
    m_B = [B[:, j].norm().item() for j in range(k)]
    D_B = [unit(B[:, j]) for j in range(k)]
    m = [[W[:, j].norm().item() for j in range(k)] for W in Ws]
    D = [[unit(W[:, j]) for j in range(k)] for W in Ws]
    # 2. divergences: |m - m_B| and 1 - cos, the latter as |D - D_B|^2 / 2 (equal for unit columns)
    div_m = [[abs(m_n[j] - m_B[j]) for j in range(k)] for m_n in m]
    div_d = [[(D_n[j] - D_B[j]).square().sum().item() / 2 for j in range(k)] for D_n in D]
    # 3.-4. ranks within the tensor, softmax over the models, calibration
    S_m, S_d = scores(div_m, t, s, tau), scores(div_d, t, s, tau)
    # 5. fuse magnitude and direction, rebuild the columns
    out = torch.empty_like(B)
    for j in range(k):
        magnitude = m_B[j] + sum(S_m[n][j] * (m[n][j] - m_B[j]) for n in range(len(Ws)))
        direction = D_B[j] + sum(S_d[n][j] * (D[n][j] - D_B[j]) for n in range(len(Ws)))
        out[:, j] = magnitude * direction
    out = out.reshape(base.T.shape if embedding else base.shape)
    return (out.T if embedding else out).to(base.dtype)


def reference_widen_elements(b, ws, t, s, tau):
    """1-D tensors: every element's change |x - b| is ranked and scored on its own."""
    b = b.reshape(-1)
    deltas = [(w.reshape(-1) - b).tolist() for w in ws]
    S = scores([[abs(x) for x in d] for d in deltas], t, s, tau)
    out = [b[i].item() + sum(S[n][i] * deltas[n][i] for n in range(len(ws))) for i in range(b.numel())]
    return torch.tensor(out, dtype=torch.float64)


# -- WIDEN: the kernel equals the formula -----------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"above_average_value_ratio": 1.2, "score_calibration_value": 0.8},
        {"temperature": 0.25},
        {"above_average_value_ratio": 0.0, "score_calibration_value": 0.5, "temperature": 2.0},
    ],
)
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2), (9,)])
def test_widen_matches_the_formula(params, shape):
    base = rand(*shape, seed=1)
    # A fine-tune (small changes) and a "continually pre-trained" model (large ones).
    small, large = changed(base, 2, 0.01), changed(base, 3, 0.5)
    ref_params = {"t": params.get("above_average_value_ratio", 1.0), "s": params.get("score_calibration_value", 1.0)}
    ref_params["tau"] = params.get("temperature", 1.0)
    assert_close(widen(base, [small, large], **params), reference_widen(base, [small, large], **ref_params))


def test_widen_of_three_models_matches_the_formula():
    base = rand(8, 6, seed=4)
    models = [changed(base, 5, 0.02), changed(base, 6, 0.3), changed(base, 7, 0.1)]
    assert_close(widen(base, models), reference_widen(base, models))


def test_widen_treats_embedding_rows_as_its_columns():
    base = rand(10, 4, seed=8)  # 10 tokens of width 4
    models = [changed(base, 9, 0.05), changed(base, 10, 0.4)]
    ours = widen(base, models, tensor=EMBEDDING)
    assert_close(ours, reference_widen(base, models, embedding=True))
    # Read as a plain matrix (4 columns instead of 10 tokens) it would differ.
    assert (ours - reference_widen(base, models)).abs().max() > 1e-3


def test_ranking_makes_models_of_different_scales_comparable():
    """A model with 1000x larger changes does not win every element: ranks, not sizes, decide."""
    base = rand(40, seed=11)
    small, large = changed(base, 12, 0.001), changed(base, 13, 1.0)
    merged = widen(base, [small, large], above_average_value_ratio=10.0)  # no calibration: softmax shares
    # merged = b + S_small (small - b) + S_large (large - b) with S_small + S_large = 1.
    d_small, d_large = (small - base).double(), (large - base).double()
    share_large = (merged.double() - base.double() - d_small) / (d_large - d_small)
    # Ranks in [0, 1]: each share lies in [1 / (1 + e), e / (1 + e)], and both models win somewhere.
    low, high = 1 / (1 + math.e), math.e / (1 + math.e)
    assert share_large.min() >= low - 1e-4 and share_large.max() <= high + 1e-4
    assert share_large.min() < 0.4 and share_large.max() > 0.6


def test_identical_models_give_the_base_plus_their_common_change():
    base = rand(7, 5, seed=14)
    model = changed(base, 15, 0.2)
    assert_close(widen(base, [model, model]), model, rel=1e-6)
    assert_close(widen(base, [model, model, model]), model, rel=1e-6)
    assert_close(widen(base[0], [model[0], model[0]]), model[0], rel=1e-6)
    assert_close(widen(base, [model, model], tensor=EMBEDDING), model, rel=1e-6)


def test_a_model_equal_to_the_base_leaves_the_other_models_changes():
    base = rand(6, 8, seed=16)
    model = changed(base, 17, 0.1)
    ours = widen(base, [model, base])
    assert_close(ours, reference_widen(base, [model, base]))
    # The unchanged model ranks 0 everywhere; the other model's columns rank above it
    # (score > 1/2, calibrated to 1: its whole change) except the column where its own
    # change is smallest, where both rank 0 and share it half and half.
    m_div = (model.norm(dim=0) - base.norm(dim=0)).abs()
    d_div = 1 - torch.nn.functional.cosine_similarity(model.double(), base.double(), dim=0)
    lowest = {int(m_div.argmin()), int(d_div.argmin())}
    for j in range(base.shape[1]):
        if j not in lowest:
            torch.testing.assert_close(ours[:, j], model[:, j], rtol=1e-5, atol=1e-6)
    assert all((ours[:, j] - model[:, j]).abs().max() > 1e-4 for j in lowest)


def test_all_models_equal_to_the_base_give_the_base():
    base = rand(5, 3, seed=18)
    assert torch.equal(widen(base, [base, base]), base)
    assert torch.equal(widen(base[0], [base[0], base[0]]), base[0])


def test_widen_keeps_the_dtype_and_accepts_empty_tensors():
    base = rand(6, 4, seed=19)
    models = [changed(base, 20, 0.05), changed(base, 21, 0.5)]
    out = widen(base.bfloat16(), [m.bfloat16() for m in models])
    assert out.dtype == torch.bfloat16
    ref = reference_widen(base.bfloat16().float(), [m.bfloat16().float() for m in models])
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    empty = torch.empty(0, 4)
    assert widen(empty, [empty, empty]).shape == (0, 4)


def test_widen_schema():
    method = methods.get("widen")
    assert method.paper == "https://arxiv.org/abs/2408.03092"
    assert method.base == BASE_REQUIRED and method.min_models == 3 and method.max_models is None
    params = {p.name: p for p in method.parameters}
    assert set(params) == {"above_average_value_ratio", "score_calibration_value", "temperature"}
    assert all(p.scope == GLOBAL and p.default == 1.0 and p.help for p in params.values())
    with pytest.raises(RecipeError, match="temperature"):
        params["temperature"].validate(0, "recipe")
    with pytest.raises(RecipeError, match="above_average_value_ratio"):
        params["above_average_value_ratio"].validate(-0.5, "recipe")


# -- Metrics-Weighted Averaging, written out ------------------------------------------


def test_loss_weights_follow_the_formula():
    losses, p = [1.3, 0.9, 1.1], 2.0
    raw = [loss ** -p for loss in losses]
    weights = [r / sum(raw) for r in raw]
    ckpts = [rand(4, 3, seed=30 + i) for i in range(3)]
    expected = sum(w * x.double() for w, x in zip(weights, ckpts)).float()
    ours = kernel("mwa", ckpts, model_params=[{"loss": v} for v in losses], penalty=p)
    assert_close(ours, expected)


def test_step_weights_follow_the_formula():
    steps, p = [100, 200, 400], 1.5
    raw = [step**p for step in steps]
    weights = [r / sum(raw) for r in raw]
    ckpts = [rand(5, seed=40 + i) for i in range(3)]
    expected = sum(w * x.double() for w, x in zip(weights, ckpts)).float()
    ours = kernel("mwa", ckpts, model_params=[{"step": v} for v in steps], metric="step", penalty=p)
    assert_close(ours, expected)


@pytest.mark.parametrize("metric, values, best", [("loss", [1.3, 0.9, 1.1], 1), ("step", [300, 100, 200], 0)])
def test_penalty_limits(metric, values, best):
    ckpts = [rand(3, 4, seed=50 + i) for i in range(3)]
    given = [{metric: v} for v in values]
    plain = kernel("mwa", ckpts, model_params=given, metric=metric, penalty=0.0)
    assert_close(plain, (sum(x.double() for x in ckpts) / 3).float())
    sharp = kernel("mwa", ckpts, model_params=given, metric=metric, penalty=500.0)
    assert_close(sharp, ckpts[best])


def test_equal_best_checkpoints_share_the_weight_at_a_large_penalty():
    ckpts = [rand(6, seed=60 + i) for i in range(3)]
    ours = kernel("mwa", ckpts, model_params=[{"loss": 0.5}, {"loss": 2.0}, {"loss": 0.5}], penalty=1000.0)
    assert_close(ours, ((ckpts[0].double() + ckpts[2].double()) / 2).float())


def test_without_normalize_the_best_checkpoint_weighs_one():
    a, b = rand(4, seed=70), rand(4, seed=71)
    ours = kernel("mwa", [a, b], model_params=[{"loss": 1.0}, {"loss": 2.0}], penalty=1.0, normalize=False)
    assert_close(ours, a + 0.5 * b)


def test_weights_do_not_depend_on_the_metric_scale():
    from core.merge.methods.mwa import metric_weights

    for metric in ("loss", "step"):
        one = metric_weights([1.0, 2.0, 5.0], metric, 1.7)
        scaled = metric_weights([1000.0, 2000.0, 5000.0], metric, 1.7)
        assert one == pytest.approx(scaled) and sum(one) == pytest.approx(1.0)


def test_a_missing_metric_is_refused_naming_the_model():
    ckpts = [rand(3, seed=80), rand(3, seed=81)]
    with pytest.raises(RecipeError, match=r"model 2 \(recipe order\) has no 'loss'"):
        kernel("mwa", ckpts, model_params=[{"loss": 1.0}, {}])
    with pytest.raises(RecipeError, match=r"model 1 \(recipe order\) has no 'step'"):
        kernel("mwa", ckpts, model_params=[{"loss": 1.0}, {"loss": 2.0}], metric="step")


def test_mwa_schema():
    method = methods.get("mwa")
    assert method.paper == "https://arxiv.org/abs/2504.18580"
    assert method.base == BASE_IGNORED and method.min_models == 2
    params = {p.name: p for p in method.parameters}
    assert params["metric"].choices == ("loss", "step") and params["metric"].default == "loss"
    assert params["penalty"].scope == GLOBAL and params["normalize"].default is True
    assert params["loss"].scope == MODEL and params["step"].scope == MODEL
    for name, bad in (("loss", 0), ("loss", -1.0), ("step", 0), ("penalty", -1.0)):
        with pytest.raises(RecipeError, match=name):
            params[name].validate(bad, "model 'ckpt'")


# -- end to end on the tiny llama family ----------------------------------------------


def test_widen_merge_runs_and_equals_the_formula_on_every_tensor(llama_family, tmp_path):
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "widen",
            "base_model": str(llama_family["base"]),
            "models": [{"model": str(llama_family["a"])}, {"model": str(llama_family["b"])}],
            "parameters": {"above_average_value_ratio": 1.0, "score_calibration_value": 1.0},
        },
    )
    plan = merge.check(recipe)
    try:
        assert plan.ops and plan.method.name == "widen"
    finally:
        plan.close()
    merge.run(recipe, tmp_path / "out", device="cpu", model_card=False)
    base, a, b = (read_state_dict(llama_family[k]) for k in ("base", "a", "b"))
    out = read_state_dict(tmp_path / "out")
    assert set(out) == set(base)
    for name, tensor in out.items():
        expected = reference_widen(base[name], [a[name], b[name]], embedding=name == EMBEDDING)
        assert_close(tensor, expected, rel=1e-5)


def test_mwa_merge_runs_and_equals_the_formula_on_every_tensor(llama_family, tmp_path):
    losses = {"a": 1.3, "b": 0.9, "c": 1.1}
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "mwa",
            "models": [{"model": str(llama_family[k]), "parameters": {"loss": v}} for k, v in losses.items()],
            "parameters": {"metric": "loss", "penalty": 2.0},
        },
    )
    merge.check(recipe).close()
    merge.run(recipe, tmp_path / "out", device="cpu", model_card=False)
    raw = {k: v**-2.0 for k, v in losses.items()}
    weights = {k: r / sum(raw.values()) for k, r in raw.items()}
    states = {k: read_state_dict(llama_family[k]) for k in losses}
    out = read_state_dict(tmp_path / "out")
    assert set(out) == set(states["a"])
    for name, tensor in out.items():
        expected = sum(weights[k] * states[k][name].double() for k in losses).float()
        assert_close(tensor, expected, rel=1e-6)


def test_check_refuses_mwa_without_the_metric_and_widen_without_enough_models(llama_family, tmp_path):
    models = [{"model": str(llama_family["a"]), "parameters": {"step": 100}}, {"model": str(llama_family["b"])}]
    with pytest.raises(RecipeError, match=r"model 2 \(recipe order\) has no 'step'"):
        merge.check(write_recipe(tmp_path, {"merge_method": "mwa", "models": models, "parameters": {"metric": "step"}}))
    base, one = str(llama_family["base"]), [{"model": str(llama_family["a"])}]
    lone = {"merge_method": "widen", "base_model": base, "models": one}
    with pytest.raises(RecipeError, match="at least 3 models"):
        merge.check(write_recipe(tmp_path, lone))
    no_base = {"merge_method": "widen", "models": [{"model": str(llama_family[k])} for k in "abc"]}
    with pytest.raises(RecipeError, match="needs a base_model"):
        merge.check(write_recipe(tmp_path, no_base))


def test_methods_command_lists_both_with_their_papers(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("widen ") and "https://arxiv.org/abs/2408.03092" in line for line in lines)
    assert any(line.startswith("mwa ") and "https://arxiv.org/abs/2504.18580" in line for line in lines)
    assert main(["methods", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listing["widen"]["base_model"] == "required" and listing["mwa"]["base_model"] == "ignored"
    assert {p["name"] for p in listing["mwa"]["parameters"]} == {"metric", "penalty", "normalize", "loss", "step"}


# -- the formula line ------------------------------------------------------------------


def doc_with(method: str, *names: str) -> RecipeDocument:
    doc = RecipeDocument()
    doc.set_method(method)
    for name in names:
        doc.add_model(f"/m/{name}", name)
    return doc


def test_widen_formula_names_the_base_and_the_models():
    doc = doc_with("widen", "qwen-base", "qwen-chat", "sailor")
    assert doc.formula() == (
        "WIDEN: qwen-base + S_qwen-chat × (qwen-chat − qwen-base) + S_sailor × (sailor − qwen-base), "
        "per column in magnitude and direction — S = softmax over the models of each one's ranked change "
        "(temperature 1.00); a score above 1.00 × average becomes 1.00"
    )
    doc.remove_slot(2)
    assert doc.formula() == "WIDEN merges two or more models into qwen-base: add models."
    doc.set_base(None)
    assert doc.formula() == "WIDEN needs a base model: mark one model as base."


def test_mwa_formula_shows_the_weights():
    doc = doc_with("mwa", "ckpt-100", "ckpt-200")
    assert doc.formula() == (
        "Metrics-Weighted Averaging needs the loss of every checkpoint: set it for ckpt-100, ckpt-200."
    )
    doc.set_param("loss", 1.0, 0)
    doc.set_param("loss", 2.0, 1)
    assert doc.formula() == (
        "0.67 × ckpt-100 + 0.33 × ckpt-200 — weights from each loss, penalty 1.00 (lower loss weighs more)"
    )
    doc.set_param("metric", "step")
    doc.set_param("step", 100, 0)
    doc.set_param("step", 300, 1)
    doc.set_param("penalty", 0.0)
    assert doc.formula() == (
        "0.50 × ckpt-100 + 0.50 × ckpt-200 — weights from each step, penalty 0.00 (later step weighs more)"
    )
    doc.set_param("penalty", [0.0, 2.0])
    assert doc.formula() == (
        "Weighted average of ckpt-100, ckpt-200 — weights step^p ÷ their sum, p = 0.00→2.00 over layers "
        "(later step weighs more)"
    )
