"""Geometric and other non-task-arithmetic merge methods, checked against mergekit 0.1.5.

Every deterministic kernel is compared with mergekit's own method object on the
same tensors and parameters (max |ours - theirs| <= 1e-6 * max |theirs|).
mergekit is a dev-only dependency; these tests are skipped without it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from core.errors import RecipeError
from core.merge import methods
from core.merge.methods.base import (
    BASE_IGNORED,
    BASE_OPTIONAL,
    BASE_REQUIRED,
    GLOBAL,
    MODEL,
    NON_BASE,
    TensorInputs,
)

torch = pytest.importorskip("torch")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")

NAMES = (
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
    "passthrough",
)
TENSOR = "model.layers.0.mlp.down_proj.weight"


# -- helpers ------------------------------------------------------------------


def rand(*shape, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def ours(
    name: str,
    tensors: list,
    base_index: int | None = None,
    model_params: list[dict] | None = None,
    seed: int = 0,
    **params: Any,
):
    """Run our kernel the way the planner binds it: defaults filled in, checks run."""
    method = methods.get(name)
    bound = {p.name: params.get(p.name, p.default) for p in method.global_parameters}
    per_model = []
    for i in range(len(tensors)):
        given = (model_params or [{}] * len(tensors))[i]
        values = {}
        for p in method.model_parameters:
            if p.scope == NON_BASE and i == base_index:
                continue
            values[p.name] = given.get(p.name, p.default)
        per_model.append(values)
    if method.check is not None:
        method.check(TENSOR, bound, per_model, base_index)
    copies = [t.clone() for t in tensors]
    inputs = TensorInputs(
        name=TENSOR,
        tensors=list(tensors),
        base_index=base_index,
        params=bound,
        model_params=per_model,
        model_keys=[f"/models/m{i}" for i in range(len(tensors))],
        seed=seed,
    )
    result = method.kernel(inputs)
    for before, after in zip(copies, tensors):
        assert torch.equal(before, after), f"{name} modified an input tensor in place"
    return result


def theirs(name: str, tensors: list, base_index: int | None = None, **parameters: Any):
    """mergekit's method on the same inputs (ids 0..n-1; per-input values keyed by id)."""
    group = mk_base.TensorGroup.from_tensors(list(tensors), base_index=base_index, name=TENSOR)
    (result,) = mk_registry.get(name)((group,), parameters=parameters)
    return result


def assert_close(a, b, rel: float = 1e-6):
    assert a.shape == b.shape
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all() == torch.isfinite(b64).all()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    diff = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    assert diff <= rel * scale + 1e-30, f"max diff {diff:.3g} vs max |ref| {scale:.3g}"


def per_id(values: dict[int, float], key: str) -> list[dict]:
    """Our model_params list from {input index: value}."""
    n = max(values) + 1 if values else 0
    return [{key: values[i]} if i in values else {} for i in range(n)]


def nb_weights(n: int, base_index: int | None, values: list[float]) -> dict[int, float]:
    ids = [i for i in range(n) if i != base_index]
    return dict(zip(ids, values))


SHAPES = [(64,), (16, 32), (64, 64), (3, 4, 5)]


# -- schema -------------------------------------------------------------------

_SCOPES = {"shared": GLOBAL, "input": MODEL, "non_base": NON_BASE}
_BASES = {"required": BASE_REQUIRED, "optional": BASE_OPTIONAL, "ignored": BASE_IGNORED}


def _type_name(value_type) -> str:
    args = [a for a in getattr(value_type, "__args__", ()) if a is not type(None)]
    return (args[0] if args else value_type).__name__


@pytest.mark.parametrize("name", NAMES)
def test_schema_matches_mergekit(name):
    ours_ = methods.get(name).to_dict()
    spec = mk_registry.get(name).spec
    json.dumps(ours_)  # the CLI and GUI serialise it
    assert ours_["name"] == name
    assert ours_["base_model"] == _BASES[spec.contract.base.value]
    assert [p["name"] for p in ours_["parameters"]] == [p.name for p in spec.parameters]
    for mine, ref in zip(ours_["parameters"], spec.parameters):
        assert mine["scope"] == _SCOPES[ref.scope.value]
        assert mine["type"] == _type_name(ref.value_type)
        assert mine["required"] == ref.required
        if not ref.required:
            assert mine["default"] == ref.default
        assert mine["help"] and "\n" not in mine["help"]
        if mine["type"] in ("float", "int"):
            # A slider span for the GUI, never a hard bound mergekit lacks.
            assert mine["slider"] is not None and mine["slider"][0] < mine["slider"][1]
            assert mine["minimum"] is None and mine["maximum"] is None


def _our_contract_accepts(name: str, count: int, base_index: int | None) -> bool:
    """The planner's structural rules plus the method's check hook."""
    method = methods.get(name)
    if method.base == BASE_IGNORED:
        base_index = None
    if method.base == BASE_REQUIRED and base_index is None:
        return False
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        return False
    if method.check is not None:
        params = {p.name: (1.0 if p.required else p.default) for p in method.global_parameters}
        model_params = [
            {p.name: 1.0 for p in method.model_parameters if not (p.scope == NON_BASE and i == base_index)}
            for i in range(count)
        ]
        try:
            method.check(TENSOR, params, model_params, base_index)
        except RecipeError:
            return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_input_contract_matches_mergekit(name):
    method = mk_registry.get(name)
    for count in range(1, 6):
        for base_index in (None, 0):
            try:
                method.validate_inputs(list(range(count)), base_index)
                accepted = True
            except ValueError:
                accepted = False
            assert _our_contract_accepts(name, count, base_index) == accepted, (count, base_index)


def test_flags():
    assert methods.get("slerp").missing_tensors == "passthrough"
    assert methods.get("nuslerp").missing_tensors == "passthrough"
    assert methods.get("arcee_fusion").missing_tensors == "passthrough"
    assert methods.get("nearswap").missing_tensors == "passthrough_base"
    assert methods.get("model_stock").missing_tensors == "base_or_skip"
    assert methods.get("arcee_fusion").random
    for name in NAMES:
        if name != "arcee_fusion":
            assert not methods.get(name).random, name


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, core.merge.methods as m; m.all_methods(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- slerp --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.5, -0.25])
@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp_matches(shape, t, base_index):
    tensors = [rand(*shape, seed=1), rand(*shape, seed=2) * 3]
    assert_close(ours("slerp", tensors, base_index, t=t), theirs("slerp", tensors, base_index, t=t))


def test_slerp_is_spherical_for_orthogonal_unit_vectors():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    out = ours("slerp", [a, b], 0, t=0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_slerp_collinear_falls_back_to_linear(sign):
    a = rand(64, 64, seed=3)
    b = sign * (a + 1e-3 * rand(64, 64, seed=4))  # |cos| ~ 0.9999995 > 0.9995
    cos = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).item()
    assert abs(cos) > 0.9995
    got = ours("slerp", [a, b], 0, t=0.3)
    assert_close(got, theirs("slerp", [a, b], 0, t=0.3))
    assert_close(got, 0.7 * a + 0.3 * b, rel=1e-6)


def test_slerp_just_below_threshold_is_spherical():
    a = rand(256, seed=5)
    noise = rand(256, seed=6)
    noise = noise - (noise @ a) / (a @ a) * a
    b = a + noise / noise.norm() * a.norm() * math.tan(math.acos(0.999))  # cos = 0.999
    got = ours("slerp", [a, b], 0, t=0.5)
    assert_close(got, theirs("slerp", [a, b], 0, t=0.5))
    assert not torch.allclose(got, 0.5 * a + 0.5 * b, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "pair",
    ["identical", "first_zero", "second_zero", "both_zero", "antipodal"],
)
def test_slerp_edge_cases(pair):
    a = rand(16, 16, seed=7)
    tensors = {
        "identical": [a, a.clone()],
        "first_zero": [torch.zeros(16, 16), a],
        "second_zero": [a, torch.zeros(16, 16)],
        "both_zero": [torch.zeros(16, 16), torch.zeros(16, 16)],
        "antipodal": [a, -a],
    }[pair]
    got = ours("slerp", tensors, 0, t=0.4)
    assert torch.isfinite(got).all()
    assert_close(got, theirs("slerp", tensors, 0, t=0.4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_slerp_dtypes(dtype):
    tensors = [rand(32, 48, seed=8, dtype=dtype), rand(32, 48, seed=9, dtype=dtype)]
    got = ours("slerp", tensors, 0, t=0.35)
    assert got.dtype == dtype
    assert torch.equal(got, theirs("slerp", tensors, 0, t=0.35))


def test_slerp_large_tensor_is_chunked_like_mergekit():
    tensors = [rand(1100, 1000, seed=10), rand(1100, 1000, seed=11)]
    assert_close(ours("slerp", tensors, 1, t=0.6), theirs("slerp", tensors, 1, t=0.6))


# -- nuslerp ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_index", [None, 0, 2])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches(shape, base_index, flatten, row_wise):
    n = 2 if base_index is None else 3
    tensors = [rand(*shape, seed=20 + i) for i in range(n)]
    weights = nb_weights(n, base_index, [0.3, 0.9])
    options = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = ours("nuslerp", tensors, base_index, per_id(weights, "weight") + [{}] * (n - len(weights)), **options)
    want = theirs("nuslerp", tensors, base_index, weight=weights, **options)
    assert_close(got, want)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [2.0, 0.0], [-0.5, 1.5]])
def test_nuslerp_weight_edge_cases(weights):
    tensors = [rand(8, 8, seed=30), rand(8, 8, seed=31)]
    w = {0: weights[0], 1: weights[1]}
    assert_close(ours("nuslerp", tensors, None, per_id(w, "weight")), theirs("nuslerp", tensors, None, weight=w))


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_collinear_and_zero(flatten):
    a = rand(8, 8, seed=32)
    for pair in ([a, 2 * a], [a, torch.zeros(8, 8)], [a, a.clone()], [a, -a]):
        w = {0: 0.4, 1: 0.6}
        got = ours("nuslerp", pair, None, per_id(w, "weight"), nuslerp_flatten=flatten)
        assert torch.isfinite(got).all()
        assert_close(got, theirs("nuslerp", pair, None, weight=w, nuslerp_flatten=flatten))


def test_nuslerp_check_needs_two_non_base_models():
    tensors = [rand(4, seed=i) for i in range(3)]
    with pytest.raises(RecipeError, match=TENSOR):
        ours("nuslerp", tensors[:2], 0, per_id({1: 1.0}, "weight"))
    with pytest.raises(RecipeError, match="exactly two"):
        ours("nuslerp", tensors, None, per_id({0: 1.0, 1: 1.0, 2: 1.0}, "weight"))


# -- multislerp ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches(shape, count, with_base, normalize):
    n = count + with_base
    base_index = 0 if with_base else None
    tensors = [rand(*shape, seed=40 + i) for i in range(n)]
    weights = nb_weights(n, base_index, [0.2, 0.5, 0.9, 0.4][:count])
    got = ours("multislerp", tensors, base_index, per_id(weights, "weight"), normalize_weights=normalize)
    want = theirs("multislerp", tensors, base_index, weight=weights, normalize_weights=normalize)
    assert_close(got, want)


def test_multislerp_antipodal_pair_falls_back_to_linear():
    a = rand(32, seed=50)
    w = {0: 0.5, 1: 0.5}
    got = ours("multislerp", [a, -a], None, per_id(w, "weight"))
    assert_close(got, theirs("multislerp", [a, -a], None, weight=w))
    assert torch.allclose(got, torch.zeros(32), atol=1e-7)


def test_multislerp_cancelling_directions_are_refused_like_mergekit():
    a = rand(32, seed=51)
    tensors = [a, -a, a, -a]
    w = {i: 0.25 for i in range(4)}
    with pytest.raises(ValueError):
        theirs("multislerp", tensors, None, weight=w)
    with pytest.raises(RecipeError, match=TENSOR):
        ours("multislerp", tensors, None, per_id(w, "weight"))


def test_multislerp_identical_and_eps():
    a = rand(16, 16, seed=52)
    tensors = [a, a.clone(), a.clone()]
    w = {0: 1.0, 1: 2.0, 2: 3.0}
    for eps in (1e-8, 1e-3):
        got = ours("multislerp", tensors, None, per_id(w, "weight"), eps=eps)
        assert_close(got, theirs("multislerp", tensors, None, weight=w, eps=eps))


def test_multislerp_check_hook():
    tensors = [rand(4, seed=i) for i in range(3)]
    with pytest.raises(RecipeError, match="sum to zero"):
        ours("multislerp", tensors[:2], None, per_id({0: 1.0, 1: -1.0}, "weight"))
    # Without normalisation (or with one model) a zero sum is fine, as in mergekit.
    ours("multislerp", tensors[:2], None, per_id({0: 1.0, 1: -1.0}, "weight"), normalize_weights=False)
    ours("multislerp", tensors[:2], 0, per_id({1: 0.0}, "weight"))
    with pytest.raises(RecipeError, match="at least one model"):
        ours("multislerp", tensors[:1], 0, [{}])


# -- karcher ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_karcher_matches(shape, count):
    tensors = [rand(*shape, seed=60 + i) * (1 + i) for i in range(count)]
    assert_close(ours("karcher", tensors), theirs("karcher", tensors))


@pytest.mark.parametrize("max_iter,tol", [(1, 1e-5), (50, 1e-7), (0, 1e-5), (10, 1e-2)])
def test_karcher_options(max_iter, tol):
    tensors = [rand(32, 32, seed=70 + i) for i in range(3)]
    got = ours("karcher", tensors, max_iter=max_iter, tol=tol)
    assert_close(got, theirs("karcher", tensors, max_iter=max_iter, tol=tol))


def test_karcher_edge_cases():
    a = rand(24, seed=80)
    zero = torch.zeros(24)
    for tensors in ([a, a.clone()], [a, zero], [zero, zero], [a, -a], [a, zero, 2 * a], [a, a + 1e-7]):
        got = ours("karcher", tensors)
        assert torch.isfinite(got).all()
        assert_close(got, theirs("karcher", tensors))


def test_karcher_of_orthogonal_unit_vectors():
    got = ours("karcher", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    assert torch.allclose(got, torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_karcher_dtypes(dtype):
    tensors = [rand(16, 16, seed=90 + i, dtype=dtype) for i in range(3)]
    got = ours("karcher", tensors)
    assert got.dtype == dtype
    assert torch.equal(got, theirs("karcher", tensors))


# -- model_stock --------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("base_index", [0, 1])
def test_model_stock_matches(shape, count, filter_wise, base_index):
    base = rand(*shape, seed=100)
    tensors = [base + 0.1 * rand(*shape, seed=101 + i) + 0.05 * rand(*shape, seed=99) for i in range(count)]
    tensors.insert(base_index, base)
    got = ours("model_stock", tensors, base_index, filter_wise=filter_wise)
    assert_close(got, theirs("model_stock", tensors, base_index, filter_wise=filter_wise))


def test_model_stock_ratio_follows_the_paper():
    # Two task vectors at 60 degrees: cos = 0.5, N = 2 -> t = 1 / 1.5.
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(0.75)])
    got = ours("model_stock", [base, a, b], 0)
    assert torch.allclose(got, (2 / 3) * (a + b) / 2, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_degenerate(filter_wise):
    base = rand(8, 8, seed=110)
    d = 0.1 * rand(8, 8, seed=111)
    cases = [
        [base, base.clone(), base.clone()],  # no change: zero task vectors
        [base, base + d, base - d],  # cos = -1, N = 2: 1 + (N-1)cos = 0 -> base
        [base, base + d, base + d],  # identical fine-tunes: cos = 1 -> t = 1
        [base, base + d, base.clone()],  # one zero task vector
    ]
    for tensors in cases:
        got = ours("model_stock", tensors, 0, filter_wise=filter_wise)
        assert torch.isfinite(got).all()
        assert_close(got, theirs("model_stock", tensors, 0, filter_wise=filter_wise))
    assert torch.equal(ours("model_stock", cases[1], 0), base)


# -- nearswap -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [1e-4, 0.01, 0.5, 10.0, 0.0, -1.0])
@pytest.mark.parametrize("base_index", [0, 1])
def test_nearswap_matches(shape, t, base_index):
    a = rand(*shape, seed=120)
    b = a + 0.3 * rand(*shape, seed=121) ** 3
    tensors = [a, b] if base_index == 0 else [b, a]
    assert_close(ours("nearswap", tensors, base_index, t=t), theirs("nearswap", tensors, base_index, t=t))


@pytest.mark.parametrize("t", [1e-4, 1e-7])
def test_nearswap_tiny_differences(t):
    # Differences below 1e-6 count as 1e-6: with t = 1e-7 they move a tenth of the way.
    a = 1e-5 * rand(16, seed=122)
    for b in (a.clone(), a + 5e-7 * rand(16, seed=123).sign()):
        assert_close(ours("nearswap", [a, b], 0, t=t), theirs("nearswap", [a, b], 0, t=t))


def test_nearswap_t_is_required():
    assert methods.get("nearswap").parameter("t").required
    assert methods.get("slerp").parameter("t").required


# -- arcee_fusion -------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(1000,), (300, 200)])
@pytest.mark.parametrize("base_index", [0, 1])
def test_arcee_fusion_matches(shape, base_index):
    a = rand(*shape, seed=130)
    b = a + 0.05 * rand(*shape, seed=131) * rand(*shape, seed=132).abs() ** 2
    tensors = [a, b] if base_index == 0 else [b, a]
    assert_close(ours("arcee_fusion", tensors, base_index), theirs("arcee_fusion", tensors, base_index))


def test_arcee_fusion_identical_and_bf16():
    a = rand(32, 32, seed=133)
    assert_close(ours("arcee_fusion", [a, a.clone()], 0), theirs("arcee_fusion", [a, a.clone()], 0))
    a16 = rand(32, 32, seed=134, dtype=torch.bfloat16)
    b16 = (a16.float() + 0.01 * rand(32, 32, seed=135)).to(torch.bfloat16)
    got = ours("arcee_fusion", [a16, b16], 0)
    assert got.dtype == torch.bfloat16  # mergekit returns float32 here; its writer casts back
    assert torch.equal(got, theirs("arcee_fusion", [a16, b16], 0).to(torch.bfloat16))


def test_arcee_fusion_large_tensor_samples_reproducibly():
    from core.merge.methods.arcee_fusion import fence, importance

    a = rand(1100, 1000, seed=140)
    b = a + 0.05 * rand(1100, 1000, seed=141)
    first = ours("arcee_fusion", [a, b], 0, seed=7)
    again = ours("arcee_fusion", [a, b], 0, seed=7)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    # Other seeds draw other samples, so the threshold moves a little.
    scores = importance(a, b)
    thresholds = set()
    for seed in range(3):
        gen = TensorInputs(TENSOR, [a, b], 0, {}, [{}, {}], ["/m0", "/m1"], seed).generator(1, "arcee_fusion_quantiles")
        thresholds.add(fence(scores, gen).item())
    assert len(thresholds) > 1
    # The sampled fence keeps about the same share of changes as the exact one.
    exact = torch.sort(scores.reshape(-1)).values
    last = exact.numel() - 1
    exact_fence = exact[last // 2] + 1.5 * (exact[3 * last // 4] - exact[last // 4])
    kept_exact = (scores >= exact_fence).double().mean().item()
    kept = (first != a).double().mean().item()
    assert kept_exact > 0.001
    assert abs(kept - kept_exact) < 0.002
    # And agrees with mergekit (which samples from torch's global RNG) almost everywhere.
    torch.manual_seed(0)
    reference = theirs("arcee_fusion", [a, b], 0)
    assert (first != reference).double().mean().item() < 0.002


# -- ram / ramplus_tl ---------------------------------------------------------


def _ram_inputs(shape, count, base_index, seed=150):
    base = rand(*shape, seed=seed)
    tensors = []
    for i in range(count):
        keep = rand(*shape, seed=seed + 10 + i) > 0.3  # sparse, overlapping changes
        delta = rand(*shape, seed=seed + 20 + i) * keep
        tiny = 1e-7 * rand(*shape, seed=seed + 30 + i)  # below epsilon: not a change
        tensors.append(base + delta + tiny)
    tensors.insert(base_index, base)
    return tensors


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("base_index", [0, 1])
def test_ram_matches(name, shape, count, base_index):
    base_index = min(base_index, count)
    tensors = _ram_inputs(shape, count, base_index)
    assert_close(ours(name, tensors, base_index), theirs(name, tensors, base_index))


@pytest.mark.parametrize(
    "options",
    [{"epsilon": 1e-3}, {"epsilon": 0.5}, {"r": 0.5, "alpha": 1.0}, {"r": 1.0, "alpha": 0.05, "epsilon": 1e-8}],
)
def test_ramplus_tl_options(options):
    tensors = _ram_inputs((32, 32), 3, 0)
    assert_close(ours("ramplus_tl", tensors, 0, **options), theirs("ramplus_tl", tensors, 0, **options))
    eps = {"epsilon": options["epsilon"]} if "epsilon" in options else {}
    assert_close(ours("ram", tensors, 0, **eps), theirs("ram", tensors, 0, **eps))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_edge_cases(name):
    base = rand(8, 8, seed=160)
    for others in ([base.clone(), base.clone()], [torch.zeros(8, 8), base.clone()], [base + 1, base + 1]):
        tensors = [base, *others]
        got = ours(name, tensors, 0)
        assert torch.isfinite(got).all()
        assert_close(got, theirs(name, tensors, 0))


def test_ram_rule():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([3.0, 0.0, 0.0, 5.0])
    assert torch.equal(ours("ram", [base, a, b], 0), torch.tensor([2.0, 2.0, 0.0, 5.0]))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_bf16(name):
    tensors = [t.to(torch.bfloat16) for t in _ram_inputs((16, 16), 3, 0)]
    got = ours(name, tensors, 0)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, theirs(name, tensors, 0).to(torch.bfloat16))


# -- passthrough --------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.0, 2.5, -1.0])
def test_passthrough_matches(scale):
    a = rand(16, 16, seed=170)
    got = ours("passthrough", [a], None, [{"scale": scale}])
    assert_close(got, theirs("passthrough", [a], None, scale={0: scale}))
    if scale is None:
        assert got is a  # no copy, as in mergekit


# -- dtypes of the group methods ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_group_methods_keep_dtype_and_match(dtype):
    tensors = [rand(16, 16, seed=180 + i, dtype=dtype) for i in range(3)]
    w = {1: 0.4, 2: 0.6}
    cases = [
        ("nuslerp", per_id(w, "weight"), {"weight": w}),
        ("multislerp", per_id(w, "weight"), {"weight": w}),
        ("model_stock", None, {}),
    ]
    for name, model_params, mk_params in cases:
        got = ours(name, tensors, 0, model_params)
        assert got.dtype == dtype, name
        want = theirs(name, tensors, 0, **mk_params)
        if dtype == torch.float64:
            assert_close(got, want)
        else:
            assert torch.equal(got, want), name
    got = ours("nearswap", tensors[:2], 0, t=0.1)
    assert got.dtype == dtype
    assert torch.equal(got, theirs("nearswap", tensors[:2], 0, t=0.1))
