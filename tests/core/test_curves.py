"""Per-layer curves: mergekit's gradient interpolation, presets, filters, recipes."""

from __future__ import annotations

import math

import pytest

from core.errors import MergeStudioError
from core.merge.curves import PRESETS, Curve, CurveGroup, LayerCurves, detect_filters
from core.merge.recipe import ModelEntry, Recipe, evaluate_setting

T_GRID = [i / 40 for i in range(41)] + [1 / 3, 2 / 3, 0.1, 0.7]


def _mergekit(setting, name: str, t: float) -> float:
    return evaluate_setting(setting, name, t, float)


# -- Curve ---------------------------------------------------------------------
@pytest.mark.parametrize("anchors", [[0.7], [0.0, 1.0], [0.2, 0.9, 0.4], [1, -2, 3, 0.5, 0.25, 4]])
def test_value_at_is_mergekit_interpolation(anchors):
    curve = Curve(tuple(anchors))
    for t in T_GRID:
        assert curve.value_at(t) == _mergekit(anchors, "x", t)
    assert curve.value_at(0.0) == anchors[0]
    assert curve.value_at(1.0) == anchors[-1]


def test_value_at_rejects_positions_outside_unit_interval():
    with pytest.raises(ValueError):
        Curve((0.0, 1.0)).value_at(1.5)


def test_at_layers_uses_plan_positions():
    curve = Curve((0.0, 1.0, 0.0))
    assert curve.at_layers(5) == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert curve.at_layers(1) == [0.0]  # a one-layer slice sits at t = 1
    assert Curve((0.2, 0.8)).at_layers(1) == [0.8]
    assert Curve((0.2, 0.8)).at_layers(4) == [_mergekit([0.2, 0.8], "x", i / 3) for i in range(4)]
    with pytest.raises(ValueError):
        curve.at_layers(0)


def test_with_anchor_and_bad_index():
    curve = Curve((0.1, 0.2, 0.3))
    assert curve.with_anchor(1, 0.9).anchors == (0.1, 0.9, 0.3)
    assert curve.anchors == (0.1, 0.2, 0.3)  # immutable
    with pytest.raises(IndexError):
        curve.with_anchor(3, 0.0)


def test_resampled():
    ramp = Curve((0.0, 1.0))
    assert ramp.resampled(5).anchors == pytest.approx((0.0, 0.25, 0.5, 0.75, 1.0))
    bend = Curve((0.0, 1.0, 0.0))
    assert bend.resampled(3) == bend
    assert bend.resampled(5).anchors == pytest.approx((0.0, 0.5, 1.0, 0.5, 0.0))
    # One anchor: the mean of the piecewise-linear curve (the triangle's area).
    assert bend.resampled(1).anchors == pytest.approx((0.5,))
    assert Curve((0.0, 0.0, 1.0)).resampled(1).anchors == pytest.approx((0.25,))
    with pytest.raises(ValueError):
        bend.resampled(0)


def test_smoothed_binomial_with_mirrored_ends():
    curve = Curve((0.0, 0.0, 1.0, 0.0, 0.0))
    assert curve.smoothed().anchors == pytest.approx((0.0, 0.25, 0.5, 0.25, 0.0))
    ends = Curve((1.0, 0.0, 0.0, 3.0))
    # a[-1] mirrors to a[1], a[n] to a[n-2]
    expected = ((0 + 2 + 0) / 4, (1 + 0 + 0) / 4, (0 + 0 + 3) / 4, (0 + 6 + 0) / 4)
    assert ends.smoothed().anchors == pytest.approx(expected)
    twice = ends.smoothed().smoothed()
    assert ends.smoothed(2).anchors == pytest.approx(twice.anchors)
    assert ends.smoothed(0) == ends
    flat = Curve((0.4,) * 6)
    assert flat.smoothed(7).anchors == pytest.approx(flat.anchors)
    assert Curve((0.3,)).smoothed(3) == Curve((0.3,))
    with pytest.raises(ValueError):
        ends.smoothed(-1)


def test_clamped():
    assert Curve((-1.0, 0.5, 2.0)).clamped(0.0, 1.0).anchors == (0.0, 0.5, 1.0)
    with pytest.raises(ValueError):
        Curve((0.5,)).clamped(1.0, 0.0)


def test_to_setting_rounds_to_six_significant_digits():
    assert Curve((1 / 3,)).to_setting() == 0.333333
    assert Curve((1 / 3, 2 / 3, 12345.678)).to_setting() == [0.333333, 0.666667, 12345.7]
    assert Curve((1e-9 / 3,)).to_setting() == pytest.approx(3.33333e-10, rel=0, abs=1e-16)


def test_from_setting():
    assert Curve.from_setting(0.5) == Curve((0.5,))
    assert Curve.from_setting(2) == Curve((2.0,))
    assert Curve.from_setting([0, 0.5, 1]).anchors == (0.0, 0.5, 1.0)
    for bad in ("0.5", True, [], [0.1, "x"], [0.1, None], {"value": 0.1}, None, float("nan"), [1, math.inf]):
        with pytest.raises(ValueError) as info:
            Curve.from_setting(bad)
        assert isinstance(info.value, MergeStudioError)
        assert str(info.value).endswith(".")


def test_curve_needs_finite_anchors():
    with pytest.raises(ValueError):
        Curve(())
    with pytest.raises(ValueError):
        Curve((0.1, float("nan")))


# -- presets -------------------------------------------------------------------
def test_presets_exist_and_stay_in_range():
    names = {
        "Flat", "Ramp up", "Ramp down", "Middle high", "Middle low", "Step up (second half)",
        "Step down (second half)", "Smooth ramp up", "Smooth ramp down",
    }
    assert names <= set(PRESETS)
    for name, build in PRESETS.items():
        for k in (1, 2, 5, 8):
            curve = build(k, 0.2, 0.8)
            assert len(curve.anchors) == k, name
            assert all(0.2 - 1e-12 <= v <= 0.8 + 1e-12 for v in curve.anchors), name


def test_preset_shapes():
    assert PRESETS["Flat"](3, 0.0, 1.0).anchors == (0.5, 0.5, 0.5)
    assert PRESETS["Ramp up"](5, 0.0, 1.0).anchors == pytest.approx((0, 0.25, 0.5, 0.75, 1))
    assert PRESETS["Ramp down"](3, 0.0, 2.0).anchors == pytest.approx((2, 1, 0))
    assert PRESETS["Middle high"](5, 0.0, 1.0).anchors == pytest.approx((0, 0.5, 1, 0.5, 0))
    assert PRESETS["Middle low"](5, 0.0, 1.0).anchors == pytest.approx((1, 0.5, 0, 0.5, 1))
    assert PRESETS["Step up (second half)"](4, 0.1, 0.9).anchors == pytest.approx((0.1, 0.1, 0.9, 0.9))
    assert PRESETS["Step down (second half)"](4, 0.1, 0.9).anchors == pytest.approx((0.9, 0.9, 0.1, 0.1))
    smooth = PRESETS["Smooth ramp up"](5, 0.0, 1.0).anchors
    assert smooth == pytest.approx(tuple(3 * t * t - 2 * t**3 for t in (0, 0.25, 0.5, 0.75, 1)))
    down = PRESETS["Smooth ramp down"](5, 0.0, 1.0).anchors
    assert down == pytest.approx(tuple(1 - v for v in smooth))


# -- LayerCurves -----------------------------------------------------------------
SPLIT = LayerCurves(Curve((0.35,)), attention=Curve((0.5, 0.9, 0.6)), mlp=Curve((0.1, 0.2)))


def test_groups():
    assert [g.key for g in LayerCurves(Curve((0.1,))).groups()] == ["default"]
    groups = SPLIT.groups()
    assert groups == [
        CurveGroup("default", "All tensors", (), Curve((0.35,))),
        CurveGroup("attention", "Attention", ("self_attn",), Curve((0.5, 0.9, 0.6))),
        CurveGroup("mlp", "MLP", ("mlp",), Curve((0.1, 0.2))),
    ]


def test_to_setting_plain_and_split():
    assert LayerCurves(Curve((0.25,))).to_setting() == 0.25
    assert LayerCurves(Curve((0.0, 1 / 3))).to_setting() == [0.0, 0.333333]
    assert SPLIT.to_setting() == [
        {"filter": "self_attn", "value": [0.5, 0.9, 0.6]},
        {"filter": "mlp", "value": [0.1, 0.2]},
        {"value": 0.35},
    ]
    bert = LayerCurves(Curve((1.0,)), Curve((0.0,)), Curve((0.5, 1.0)), ("attention",), ("intermediate", "output"))
    assert bert.to_setting() == [
        {"filter": "attention", "value": 0.0},
        {"filter": "intermediate", "value": [0.5, 1.0]},
        {"filter": "output", "value": [0.5, 1.0]},
        {"value": 1.0},
    ]
    assert LayerCurves.from_setting(bert.to_setting(), ("attention",), ("intermediate", "output")) == bert


def test_from_setting_round_trips():
    assert LayerCurves.from_setting(0.4) == LayerCurves(Curve((0.4,)))
    assert LayerCurves.from_setting([0, 1]) == LayerCurves(Curve((0.0, 1.0)))
    assert LayerCurves.from_setting(SPLIT.to_setting()) == SPLIT
    only_mlp = LayerCurves(Curve((0.3,)), mlp=Curve((0.1, 0.5)))
    assert LayerCurves.from_setting(only_mlp.to_setting()) == only_mlp
    star = [{"filter": "self_attn", "value": 0.2}, {"filter": "*", "value": 0.7}]
    assert LayerCurves.from_setting(star) == LayerCurves(Curve((0.7,)), attention=Curve((0.2,)))
    gpt2 = LayerCurves.from_setting([{"filter": "attn", "value": 0.1}, {"value": 0.2}], ("attn",), ("mlp",))
    assert gpt2 is not None and gpt2.attention == Curve((0.1,)) and gpt2.attention_filters == ("attn",)


@pytest.mark.parametrize(
    "setting",
    [
        [{"filter": "lm_head", "value": 0.1}, {"value": 0.2}],  # a filter the editor has no curve for
        [{"filter": "self_attn", "value": 0.1}],  # no default: other tensors would get the method default
        {"filter": "self_attn", "value": 0.1},
        [{"filter": "self_attn", "value": "x"}, {"value": 0.2}],  # not a number
        "0.5",
        True,
        [],
        [{"filter": "mlp", "value": 0.1}, {"filter": "self_attn", "value": 0.3}, {"value": 0.2}],  # order matters
        [{"value": 0.2}, {"filter": "mlp", "value": 0.1}],  # a condition after the default
        [{"filter": "mlp", "value": 0.1}, {"filter": "mlp", "value": 0.3}, {"value": 0.2}],
    ],
)
def test_from_setting_refuses_what_it_cannot_show(setting):
    assert LayerCurves.from_setting(setting) is None


def test_from_setting_needs_every_filter_of_a_group_with_one_curve():
    filters = (("attention",), ("intermediate", "output"))
    partial = [{"filter": "intermediate", "value": 0.1}, {"value": 0.2}]
    assert LayerCurves.from_setting(partial, *filters) is None
    differ = [{"filter": "intermediate", "value": 0.1}, {"filter": "output", "value": 0.3}, {"value": 0.2}]
    assert LayerCurves.from_setting(differ, *filters) is None


BERT_NAMES = [
    "embeddings.word_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.output.dense.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.output.dense.weight",
    "encoder.layer.0.output.LayerNorm.weight",
    "pooler.dense.weight",
]


def test_value_for_equals_mergekit_evaluation():
    cases = [
        (SPLIT, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.0.input_layernorm.weight", "lm_head.weight"]),
        (LayerCurves(Curve((0.1, 1 / 3)), None, Curve((1 / 7, 0.2, 0.9)), ("attention",), ("intermediate", "output")),
         BERT_NAMES),
        (LayerCurves(Curve((0.2, 0.4)), Curve((1.0, 0.0)), Curve((0.3,)), ("attention",), ("intermediate", "output")),
         BERT_NAMES),
    ]
    for curves, names in cases:
        setting = curves.to_setting()
        for name in names:
            for t in T_GRID:
                assert curves.value_for(name, t) == _mergekit(setting, name, t), (name, t)
    # attention is written first, so BERT's attention.output goes to the attention curve
    bert = cases[2][0]
    assert bert.value_for("encoder.layer.0.attention.output.dense.weight", 0.0) == 1.0
    assert bert.value_for("encoder.layer.0.output.dense.weight", 0.0) == 0.3
    assert bert.value_for("pooler.dense.weight", 0.0) == 0.2


def test_invalid_filters_refused():
    with pytest.raises(ValueError):
        LayerCurves(Curve((0.1,)), attention_filters=())
    with pytest.raises(ValueError):
        LayerCurves(Curve((0.1,)), mlp_filters=("",))


# -- architectures -----------------------------------------------------------------
def _tensor_names(path) -> list[str]:
    from core.io.formats import open_model

    source = open_model(path)
    try:
        return list(source.tensors)
    finally:
        source.close()


def test_detect_filters_on_real_models(llama_family, gpt2_family, bert_family):
    assert detect_filters(_tensor_names(llama_family["base"])) == (("self_attn",), ("mlp",))
    assert detect_filters(_tensor_names(gpt2_family["base"])) == (("attn",), ("mlp",))
    assert detect_filters(_tensor_names(bert_family["base"])) == (("attention",), ("intermediate", "output"))
    assert detect_filters(["conv.weight", "fc.bias"]) == (("attn",), ("mlp",))
    assert detect_filters([]) == (("attn",), ("mlp",))


@pytest.mark.parametrize("family", ["llama_family", "gpt2_family", "bert_family"])
def test_recipe_gets_the_predicted_value_per_tensor(family, request):
    import core.merge as merge

    paths = request.getfixturevalue(family)
    attention, mlp = detect_filters(_tensor_names(paths["base"]))
    curves_a = LayerCurves(Curve((0.35,)), Curve((0.5, 0.9, 0.6)), Curve((0.1, 0.2)), attention, mlp)
    curves_b = LayerCurves(Curve((1 / 3, 0.8)), Curve((0.7,)), Curve((0.05, 0.45, 0.15, 0.25)), attention, mlp)
    recipe = Recipe(
        merge_method="linear",
        models=[
            ModelEntry(str(paths["a"]), {"weight": curves_a.to_setting()}),
            ModelEntry(str(paths["b"]), {"weight": curves_b.to_setting()}),
        ],
    )
    plan = merge.check(recipe)
    try:
        n_layers = plan.models[0].layout.count
        seen: set[str] = set()
        for op in plan.ops:
            if op.copy:
                continue
            t = 0.0 if op.layer is None else (op.layer / (n_layers - 1) if n_layers > 1 else 1.0)
            for pos, curves in enumerate((curves_a, curves_b)):
                assert op.model_params[pos]["weight"] == curves.value_for(op.inputs[pos][1], t), op.out_name
            group = next((g.key for g in curves_a.groups()[1:] if any(f in op.out_name for f in g.filters)), "default")
            seen.add(group)
        assert seen == {"default", "attention", "mlp"}  # every curve reached some tensor
    finally:
        plan.close()
