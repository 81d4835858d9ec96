"""Task-arithmetic family (task_arithmetic, ties, dare_*, della*, breadcrumbs*, sce).

Deterministic methods are compared with mergekit 0.1.5 (a dev-only dependency,
called at the tensor level) and, for tie-breaking, with a sort written out here.
Random methods are checked statistically and for reproducibility.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from core.errors import RecipeError
from core.merge.methods import get
from core.merge.methods.base import GLOBAL, TensorInputs
from core.merge.methods.sparsify import magprune_probabilities

GTA = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
)
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
TOL = 1e-6


def mergekit_method(name):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    return registry.get(name)


def make_inputs(name, tensors, base_index, model_values=None, seed=0, tensor_name="w", keys=None, **params):
    """TensorInputs with the method's defaults, ``params`` global, per-model lists in ``model_values``."""
    method = get(name)
    resolved = {p.name: p.default for p in method.parameters if p.scope == GLOBAL}
    resolved.update(params)
    model_values = model_values or {}
    others = [i for i in range(len(tensors)) if i != base_index]
    model_params = [{} for _ in tensors]
    for p in method.model_parameters:
        for row, i in enumerate(others):
            if p.name in model_values:
                model_params[i][p.name] = model_values[p.name][row]
            elif not p.required:
                model_params[i][p.name] = p.default
    keys = keys or [f"/models/m{i}" for i in range(len(tensors))]
    return TensorInputs(tensor_name, list(tensors), base_index, resolved, model_params, keys, seed)


def ours(name, tensors, base_index, model_values=None, **kw):
    inputs = make_inputs(name, tensors, base_index, model_values, **kw)
    return get(name).kernel(inputs)


def reference(name, tensors, base_index, model_values=None, **params):
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    return mergekit_method(name)([group], parameters={**(model_values or {}), **params})[0]


def rel_diff(a, b):
    """max |a - b| / max |b|: the difference relative to the tensor's scale.

    Elementwise ratios would measure cancellation in ``base + delta`` rather than
    the merge (mergekit sums L1 norms in float32, we in float64).
    """
    scale = b.abs().max().double().clamp(min=1e-30)
    return ((a.double() - b.double()).abs().max() / scale).item()


def random_tensors(count, shape, gen, scale=1.0, quantize=None):
    base = torch.randn(shape, generator=gen)
    tensors = [base]
    for _ in range(count - 1):
        delta = torch.randn(shape, generator=gen) * scale
        if quantize:
            delta = torch.round(delta * quantize) / quantize  # many exact ties
        tensors.append(base + delta if not quantize else delta)
    if quantize:  # base zero so deltas are exact
        tensors[0] = torch.zeros(shape)
    return tensors


def parity_cases():
    rng = random.Random(1234)
    shapes = [(300,), (64, 64), (17, 23), (5,), (1,)]
    cases = []
    for name, shape, count in itertools.product(
        ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"), shapes, (2, 3, 4)
    ):
        n = count - 1
        values = {"weight": [rng.choice([1.0, 0.5, 0.3, -0.4, 1.7]) for _ in range(n)]}
        if name != "task_arithmetic":
            values["density"] = [rng.choice([1.0, 0.9, 0.5, 0.33, 0.2]) for _ in range(n)]
        if name.startswith("breadcrumbs"):
            values["gamma"] = [min(rng.choice([0.0, 0.01, 0.05, 0.1]), 1 - d) for d in values["density"]]
        params = {
            "lambda": rng.choice([1.0, 0.7, 1.3]),
            "normalize": rng.choice([True, False]),
            "rescale": rng.choice([True, False]),
        }
        if params["normalize"] and abs(sum(values["weight"])) < 1e-6:
            values["weight"][0] += 0.5
        base_index = rng.choice([0, count - 1])
        cases.append((name, shape, count, values, params, base_index))
    return cases


@pytest.mark.parametrize("case", parity_cases(), ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}")
def test_deterministic_methods_match_mergekit(case):
    name, shape, count, values, params, base_index = case
    gen = torch.Generator().manual_seed(hash((name, shape, count)) & 0xFFFF)
    tensors = random_tensors(count, shape, gen)
    if base_index != 0:
        tensors = tensors[1:] + tensors[:1]
    expected = reference(name, tensors, base_index, values, **params)
    got = ours(name, tensors, base_index, values, **params)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if name.startswith("breadcrumbs") and any(int(d * tensors[0].numel()) == 0 for d in values["density"]):
        # mergekit drops every element of such a small tensor; we keep one (see the defect test).
        assert not torch.equal(got, expected)
        return
    assert rel_diff(got, expected) <= TOL


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_at_full_density_match_mergekit(name):
    """With density 1 nothing is dropped, so the random methods are deterministic."""
    gen = torch.Generator().manual_seed(7)
    tensors = random_tensors(4, (40, 30), gen)
    values = {"weight": [0.6, -0.3, 0.9]}
    for normalize in (True, False):
        expected = reference(name, tensors, 0, values, normalize=normalize, **{"lambda": 0.8})
        got = ours(name, tensors, 0, values, normalize=normalize, **{"lambda": 0.8})
        assert rel_diff(got, expected) <= TOL


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.5, 0.3, 0.1])
@pytest.mark.parametrize("shape", [(300,), (64, 64), (9, 7)])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_sce_matches_mergekit(select_topk, shape, count):
    gen = torch.Generator().manual_seed(count * 100 + int(select_topk * 10))
    tensors = random_tensors(count, shape, gen)
    expected = reference("sce", tensors, 0, select_topk=select_topk)
    got = ours("sce", tensors, 0, select_topk=select_topk)
    assert rel_diff(got, expected) <= TOL


def test_sce_small_deltas_fall_back_to_uniform_weights_like_mergekit():
    gen = torch.Generator().manual_seed(3)
    tensors = random_tensors(3, (32, 32), gen, scale=1e-4)
    expected = reference("sce", tensors, 0, select_topk=0.5)
    assert rel_diff(ours("sce", tensors, 0, select_topk=0.5), expected) <= TOL


@pytest.mark.parametrize("numel", [6, 10, 16])
@pytest.mark.parametrize("density", [0.5, 0.3, 0.7])
def test_ties_exact_ties_match_mergekit_on_small_tensors(numel, density):
    """Integer deltas tie at the trim boundary; mergekit's CPU sort is stable up to 16 elements."""
    gen = torch.Generator().manual_seed(numel)
    tensors = [torch.zeros(numel)] + [torch.randint(-2, 3, (numel,), generator=gen).float() for _ in range(3)]
    values = {"weight": [1.0, 0.5, 0.25], "density": [density] * 3}
    for normalize in (True, False):
        expected = reference("ties", tensors, 0, values, normalize=normalize)
        got = ours("ties", tensors, 0, values, normalize=normalize)
        assert rel_diff(got, expected) <= TOL


def stable_trim(delta, density):
    """TIES trim written out: keep the first k of a stable descending sort of |delta|."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    mask = torch.zeros(flat.numel())
    mask[order] = 1
    return (flat * mask).reshape(delta.shape)


def test_ties_exact_ties_on_larger_tensors_keep_lowest_indices():
    gen = torch.Generator().manual_seed(11)
    tensors = random_tensors(4, (24, 20), gen, quantize=2)  # deltas in steps of 0.5: many ties
    weights, densities = [0.7, 1.1, 0.4], [0.45, 0.3, 0.6]
    deltas = [stable_trim(t, d) * w for t, d, w in zip(tensors[1:], densities, weights)]
    stacked = torch.stack(deltas)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    divisor = (torch.tensor(weights).reshape(-1, 1, 1) * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = (stacked * agree).sum(0) / divisor
    got = ours("ties", tensors, 0, {"weight": weights, "density": densities})
    assert rel_diff(got, expected) <= TOL
    # Exactly k elements survive in each trimmed delta despite the ties.
    single = ours("ties", tensors[:2], 0, {"weight": [1.0], "density": [0.45]}, normalize=False)
    assert int(torch.count_nonzero(single)) == int(0.45 * 480)


def test_breadcrumbs_small_tensor_keeps_something_where_mergekit_keeps_nothing():
    base = torch.zeros(5)
    model = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2])
    values = {"weight": [1.0], "density": [0.1], "gamma": [0.01]}
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        expected = reference(name, [base, model], 0, values)
        assert torch.count_nonzero(expected) == 0  # mergekit: floor(0.1 * 5) = 0 kept
        got = ours(name, [base, model], 0, values)
        # One element kept; no outlier dropped (floor(0.01 * 5) = 0): the largest.
        assert torch.equal(got, torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0]))
    # Where mergekit keeps something, outliers are dropped the same way.
    model = torch.arange(1.0, 21.0)
    values = {"weight": [1.0], "density": [0.5], "gamma": [0.1]}
    got = ours("breadcrumbs", [torch.zeros(20), model], 0, values)
    assert torch.equal(got, reference("breadcrumbs", [torch.zeros(20), model], 0, values))
    assert torch.equal(torch.nonzero(got).flatten(), torch.arange(8, 18))


def test_sce_small_tensor_selects_something_where_mergekit_selects_nothing():
    tensors = [torch.zeros(4), torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 0.5, 0.1])]
    expected = reference("sce", tensors, 0, select_topk=0.1)
    assert torch.count_nonzero(expected) == 0
    got = ours("sce", tensors, 0, select_topk=0.1)
    assert torch.count_nonzero(got) == 1 and got[1] != 0  # the highest-variance element


def test_dtypes_and_inputs_untouched():
    gen = torch.Generator().manual_seed(5)
    tensors = random_tensors(3, (16, 16), gen)
    values = {"weight": [0.5, 0.5], "density": [0.5, 0.5]}
    f64 = [t.double() for t in tensors]
    got64 = ours("ties", f64, 0, values)
    assert got64.dtype == torch.float64
    assert rel_diff(got64, reference("ties", f64, 0, values)) <= 1e-12
    bf16 = [t.bfloat16() for t in tensors]
    copies = [t.clone() for t in bf16]
    for name in GTA + ("sce",):
        got = ours(name, bf16, 0, {k: v for k, v in values.items() if k != "density" or name != "sce"})
        assert got.dtype == torch.bfloat16 and got.shape == (16, 16)
        assert all(torch.equal(a, b) for a, b in zip(bf16, copies))
    # bf16 inputs are merged in float32 and rounded once at the end.
    expected = ours("ties", [t.float() for t in bf16], 0, values).bfloat16()
    assert torch.equal(ours("ties", bf16, 0, values), expected)


def test_base_only_returns_base():
    base = torch.randn(10)
    for name in GTA + ("sce",):
        assert torch.equal(ours(name, [base], 0), base)


# --- random methods ---------------------------------------------------------------

BIG = (400, 500)  # 200k elements


def one_model_delta(name, delta, density, seed=0, tensor_name="w", epsilon=0.1, **params):
    base = torch.zeros_like(delta)
    values = {"weight": [1.0], "density": [density]}
    if name.startswith("della"):
        values["epsilon"] = [epsilon]
    return ours(name, [base, delta], 0, values, seed=seed, tensor_name=tensor_name, normalize=False, **params)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_random_kept_fraction_and_rescale(name, density):
    gen = torch.Generator().manual_seed(21)
    delta = torch.randn(BIG, generator=gen)
    n = delta.numel()
    epsilon = min(0.1, density, 1 - density)
    plain = one_model_delta(name, delta, density, rescale=False, epsilon=epsilon)
    kept = plain != 0
    std = (density * (1 - density) / n) ** 0.5 + epsilon / n**0.5
    assert abs(kept.float().mean().item() - density) < 5 * std
    assert torch.equal(plain[kept], delta[kept])  # no rescale: survivors untouched
    l1 = one_model_delta(name, delta, density, rescale=True, rescale_mode="l1", epsilon=epsilon)
    assert torch.equal(l1 != 0, kept)  # same seed, same mask
    assert abs(l1.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-5
    scaled = one_model_delta(name, delta, density, rescale=True, rescale_mode="density", epsilon=epsilon)
    if name == "dare_linear":
        assert rel_diff(scaled[kept], delta[kept] / density) <= TOL
    else:
        probs = magprune_probabilities(delta.abs(), density, epsilon)
        assert rel_diff(scaled[kept], delta[kept] / probs[kept]) <= TOL


def test_della_probabilities_follow_magnitude_rank():
    magnitude = torch.tensor([[0.3, 0.1, 0.9, 0.5, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0]])
    probs = magprune_probabilities(magnitude, 0.5, 0.2)
    expected = torch.tensor([[0.4, 0.3, 0.7, 0.5, 0.6], [0.7, 0.6, 0.5, 0.4, 0.3]])
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.equal(magprune_probabilities(torch.ones(3, 1), 0.4, 0.1), torch.full((3, 1), 0.4))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_expectation_over_seeds_is_the_undropped_merge(name):
    gen = torch.Generator().manual_seed(4)
    tensors = random_tensors(3, (40, 50), gen)
    values = {"weight": [0.7, 0.4], "density": [0.5, 0.3]}
    if name == "della_linear":
        values["epsilon"] = [0.2, 0.1]
    undropped = ours("task_arithmetic", tensors, 0, {"weight": values["weight"]})
    seeds = 400
    total = torch.zeros(40, 50, dtype=torch.float64)
    for seed in range(seeds):
        total += ours(name, tensors, 0, values, seed=seed, rescale_mode="density").double()
    mean = total / seeds
    # Per-element variance of the estimate: sum_i w_i^2 d_i^2 (1 - p) / p / seeds (p >= 0.2).
    deltas = [t - tensors[0] for t in tensors[1:]]
    var = sum(w * w * d.double() ** 2 * 4.0 for w, d in zip(values["weight"], deltas)) / seeds
    z = (mean - undropped.double()).abs() / var.sqrt().clamp(min=1e-12)
    assert z.mean().item() < 1.0  # a biased estimate would sit far above this
    assert (z > 6).sum().item() == 0


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_are_reproducible(name):
    gen = torch.Generator().manual_seed(8)
    tensors = random_tensors(3, BIG, gen)
    values = {"weight": [0.6, 0.5], "density": [0.4, 0.6]}
    if name.startswith("della"):
        values["epsilon"] = [0.1, 0.2]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ours(name, tensors, 0, values, seed=42)
        torch.set_num_threads(2)
        two = ours(name, tensors, 0, values, seed=42)
    finally:
        torch.set_num_threads(threads)
    assert one.numpy().tobytes() == two.numpy().tobytes()
    other_name = ours(name, tensors, 0, values, seed=42, tensor_name="model.layers.1.w")
    other_seed = ours(name, tensors, 0, values, seed=43)
    assert not torch.equal((one - tensors[0]) == 0, (other_name - tensors[0]) == 0)
    assert not torch.equal(one, other_seed)
    # The global RNG is neither used nor disturbed.
    state = torch.get_rng_state()
    again = ours(name, tensors, 0, values, seed=42)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again, one)


def test_models_get_independent_masks():
    base = torch.zeros(BIG)
    delta = torch.ones(BIG)
    inputs = make_inputs("dare_linear", [base, delta, delta], 0, {"weight": [1.0, 1.0], "density": [0.5, 0.5]})
    merged = get("dare_linear").kernel(inputs)
    # Two independent masks: 0, 2 or 4 (values 2 with l1 rescale), each with probability 1/4, 1/2, 1/4.
    share_both = (merged > 3).float().mean().item()
    assert abs(share_both - 0.25) < 0.01


# --- schema and checks --------------------------------------------------------------


@pytest.mark.parametrize("name", GTA + ("sce",))
def test_schema_matches_mergekit_and_is_complete(name):
    method = get(name)
    spec = mergekit_method(name).spec
    info = method.to_dict()
    assert info["base_model"] == "required"
    assert info["display_name"] == spec.pretty_name and info["paper"] == spec.reference_url
    assert info["random"] == (name in RANDOM)
    ours_params = {p["name"]: p for p in info["parameters"]}
    scopes = {"shared": "global", "non_base": "non_base", "input": "model"}
    for p in spec.parameters:
        mine = ours_params[p.name]
        assert mine["scope"] == scopes[p.scope.value], p.name
        assert mine["required"] == p.required, p.name
        if not p.required:
            assert mine["default"] == p.default, p.name
    extra = set(ours_params) - {p.name for p in spec.parameters}
    assert extra == ({"rescale_mode"} if name in RANDOM else set())
    for p in info["parameters"]:
        assert p["type"] in ("float", "bool", "str") and p["help"] and "\n" not in p["help"]
        assert "minimum" in p and "maximum" in p and "default" in p
    if "density" in ours_params:
        d = ours_params["density"]
        assert (d["minimum"], d["maximum"], d["exclusive_minimum"]) == (0.0, 1.0, True)


def run_check(name, weights, normalize=True, **per_model):
    method = get(name)
    model_params = [{}] + [{"weight": w, **{k: v[i] for k, v in per_model.items()}} for i, w in enumerate(weights)]
    params = {p.name: p.default for p in method.global_parameters}
    params["normalize"] = normalize
    method.check("model.layers.0.mlp.up_proj.weight", params, model_params, 0)


@pytest.mark.parametrize("name", GTA)
def test_zero_weight_sum_with_normalize_is_refused(name):
    with pytest.raises(RecipeError, match="up_proj.weight.*sum to zero"):
        run_check(name, [0.5, -0.5])
    run_check(name, [0.5, -0.5], normalize=False)
    run_check(name, [0.5, 0.5])


def test_della_epsilon_out_of_range_is_refused():
    with pytest.raises(RecipeError, match="up_proj.weight.*model 3.*epsilon"):
        run_check("della", [1.0, 1.0], density=[0.5, 0.1], epsilon=[0.15, 0.15])
    with pytest.raises(RecipeError, match="density \\+ epsilon"):
        run_check("della_linear", [1.0], normalize=False, density=[0.9], epsilon=[0.15])
    run_check("della", [1.0], density=[0.5], epsilon=[0.5])
    run_check("della", [1.0], density=[1.0], epsilon=[0.4])  # nothing dropped, epsilon unused
    assert get("della").parameter("epsilon").maximum == 0.5


def test_breadcrumbs_gamma_beyond_the_dropped_share_is_refused():
    with pytest.raises(RecipeError, match="up_proj.weight.*gamma"):
        run_check("breadcrumbs", [1.0], normalize=False, density=[0.95], gamma=[0.1])
    run_check("breadcrumbs_ties", [1.0], normalize=False, density=[0.9], gamma=[0.1])


def test_parameter_validation_ranges():
    density = get("ties").parameter("density")
    with pytest.raises(RecipeError):
        density.validate(0.0, "ties")
    with pytest.raises(RecipeError):
        density.validate(1.5, "ties")
    assert density.validate(1, "ties") == 1.0
    with pytest.raises(RecipeError):
        get("dare_ties").parameter("rescale_mode").validate("l2", "dare_ties")
    assert get("ties").parameter("weight").validate(-2.5, "ties") == -2.5


@pytest.mark.parametrize("shape", [(0,), (), (4, 5, 6), (7, 1)])
def test_odd_shapes(shape):
    gen = torch.Generator().manual_seed(2)
    tensors = random_tensors(3, shape, gen)
    values = {"weight": [0.6, 0.5], "density": [0.5, 0.4]}
    for name in GTA + ("sce",):
        got = ours(name, tensors, 0, values, **({"select_topk": 0.5} if name == "sce" else {}))
        assert got.shape == tensors[0].shape and bool(torch.isfinite(got).all())
    if tensors[0].numel() > 0:
        # At this density mergekit's breadcrumbs keeps nothing of tensors under 3 elements.
        for name in ("ties", "breadcrumbs_ties") if tensors[0].numel() >= 3 else ("ties",):
            assert rel_diff(ours(name, tensors, 0, values), reference(name, tensors, 0, values)) <= TOL
        if tensors[0].numel() >= 2:  # below that mergekit's SCE selects nothing
            expected = reference("sce", tensors, 0, select_topk=0.5)
            assert rel_diff(ours("sce", tensors, 0, select_topk=0.5), expected) <= TOL


# -- large tensors take the chunked path; it must be bit-identical -----------------
@pytest.mark.parametrize("name", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("values", ["continuous", "few_levels"])
def test_chunked_path_is_bit_identical(name, rescale, values, monkeypatch):
    import core.merge.methods.task_arithmetic as ta
    from core.merge.methods.chunked import CHUNK, MIN_ELEMENTS

    gen = torch.Generator().manual_seed(7)
    n = MIN_ELEMENTS + CHUNK // 3  # a partial last chunk
    base = torch.randn(n, generator=gen) * 0.02
    tensors = [base]
    for _ in range(3):
        delta = torch.randn(n, generator=gen) * 0.002
        if values == "few_levels":  # many exact ties at the trim threshold, across chunks
            delta = torch.round(delta * 2000) / 2000
        tensors.append(base + delta)
    params = {"normalize": True, "rescale": rescale, "lambda": 0.9, "int8_mask": False}
    model_params = [{}] + [{"weight": w, "density": 0.37} for w in (0.5, 0.3, -0.1)]
    inputs = TensorInputs("layer.weight", tensors, 0, params, model_params)
    chunked = get(name).kernel(inputs)
    monkeypatch.setattr(ta, "MIN_ELEMENTS", 10**12)
    whole = get(name).kernel(inputs)
    assert torch.equal(chunked, whole)
