"""The recipe document behind the recipe editor, and its formula line.

Expectations are written out here (YAML structures, formula strings), never
produced by a second call of the code under test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import core.merge as merge
from core.errors import RecipeError
from core.merge.document import RecipeDocument
from core.merge.recipe import load_recipe


def recorder(doc: RecipeDocument) -> list:
    """Payloads of ``doc.events.changed``, in order."""
    seen: list = []
    doc.events.changed.connect(seen.append)
    return seen


def doc_with(method: str, *refs: str) -> RecipeDocument:
    """A document of ``method`` whose slots are /m/<ref>, shown as <ref>."""
    doc = RecipeDocument()
    doc.set_method(method)
    for ref in refs:
        doc.add_model(f"/m/{ref}", ref)
    return doc


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.endswith(".") and text.count(". ") == 0


# ----------------------------------------------------------------------------- slots


def test_add_model_names_slots_and_labels():
    doc = RecipeDocument()
    seen = recorder(doc)
    assert doc.add_model("/models/mistral-base") == 0
    assert doc.add_model("/models/mistral-chat", "chat") == 1
    assert [(s.ref, s.name) for s in doc.slots] == [("/models/mistral-base", "mistral-base"), ("/models/mistral-chat", "chat")]
    assert [doc.label(0), doc.label(1), doc.label(26)] == ["A", "B", "M27"]
    assert doc.base_index is None  # linear takes no base
    assert doc.display(1) == "B (chat)"
    assert seen == ["slots", "slots"]


def test_duplicate_model_is_refused_with_one_sentence():
    doc = doc_with("linear", "a", "b")
    seen = recorder(doc)
    with pytest.raises(RecipeError) as info:
        doc.add_model("/m/a", "again")
    assert "'again'" in str(info.value) and "already in the recipe" in str(info.value)
    assert one_sentence(str(info.value))
    assert [s.ref for s in doc.slots] == ["/m/a", "/m/b"]
    assert seen == []


def test_remove_and_move_keep_the_base_on_its_model():
    doc = doc_with("ties", "base", "a", "b")
    assert doc.base_index == 0
    seen = recorder(doc)
    doc.move_slot(0, 2)
    assert [s.name for s in doc.slots] == ["a", "b", "base"]
    assert doc.base_index == 2
    doc.move_slot(2, 2)  # no move, no event
    doc.move_slot(1, 99)  # clamped to the end
    assert [s.name for s in doc.slots] == ["a", "base", "b"]
    assert doc.base_index == 1
    doc.remove_slot(0)
    assert [s.name for s in doc.slots] == ["base", "b"]
    assert doc.base_index == 0
    doc.remove_slot(0)
    assert [s.name for s in doc.slots] == ["b"]
    assert doc.base_index is None
    assert seen == ["slots", "slots", "slots", "slots"]


@pytest.mark.parametrize("call", ["remove_slot", "move_slot", "set_base", "set_param"])
def test_a_slot_that_does_not_exist_is_one_sentence(call):
    doc = doc_with("linear", "a", "b")
    seen = recorder(doc)
    args = {"remove_slot": (5,), "move_slot": (5, 0), "set_base": (5,), "set_param": ("weight", 0.5, 5)}[call]
    with pytest.raises(RecipeError, match="There is no model slot 5"):
        getattr(doc, call)(*args)
    assert len(doc.slots) == 2 and seen == []


# ----------------------------------------------------------------------------- base role


def test_methods_that_need_a_base_take_slot_zero():
    doc = doc_with("ties", "base", "a")
    assert doc.base_index == 0
    assert doc.display(0) == "Base (base)"
    doc = doc_with("linear", "x", "y")
    doc.set_method("task_arithmetic")
    assert doc.base_index == 0
    doc = doc_with("linear", "x", "y")
    doc.add_model("/m/z", "z", as_base=True)
    assert doc.base_index == 2


def test_an_optional_base_is_not_picked_for_the_user():
    """nuslerp merges two weighted models; making one of them the base would leave one."""
    doc = doc_with("nuslerp", "a", "b")
    assert doc.base_index is None
    assert [s.params for s in doc.slots] == [{"weight": 1.0}, {"weight": 1.0}]


def test_the_base_loses_non_base_parameters():
    doc = doc_with("ties", "base", "a", "b")
    assert [s.params for s in doc.slots] == [{}, {"weight": 1.0}, {"weight": 1.0}]
    doc.set_param("weight", 0.3, 1)
    doc.set_param("density", 0.6, 1)
    seen = recorder(doc)
    doc.set_base(1)
    assert doc.base_index == 1
    # the new base drops its TIES weight and density; the old base gets a visible weight
    assert [s.params for s in doc.slots] == [{"weight": 1.0}, {}, {"weight": 1.0}]
    assert [p.name for p in doc.slot_parameters(1)] == []
    assert [p.name for p in doc.slot_parameters(0)] == ["weight", "density"]
    with pytest.raises(RecipeError, match="'weight' of ties is not set for the base model"):
        doc.set_param("weight", 0.5, 1)
    doc.set_base(None)
    assert doc.base_index is None
    assert seen == ["slots", "slots"]


# ----------------------------------------------------------------------------- method and parameters


def test_required_parameters_get_visible_starting_values():
    doc = doc_with("linear", "a", "b")
    assert [s.params for s in doc.slots] == [{"weight": 1.0}, {"weight": 1.0}]
    assert doc.params == {}
    doc.set_method("slerp")
    assert doc.params == {"t": 0.5}
    assert [s.params for s in doc.slots] == [{}, {}]
    doc = doc_with("nearswap", "a", "b")  # its t is a similarity threshold in (0, 0.01), not slerp's 0.5
    assert 0 < doc.params["t"] <= 0.01


def test_set_method_keeps_shared_settings_and_restores_set_aside_ones():
    doc = doc_with("linear", "a", "b")
    doc.set_param("weight", 0.3, 0)
    doc.set_param("weight", 0.7, 1)
    doc.set_param("normalize", False)
    seen = recorder(doc)

    doc.set_method("ties")
    assert doc.base_index == 0
    assert doc.params == {"normalize": False}  # shared by both methods
    assert [s.params for s in doc.slots] == [{}, {"weight": 0.7}]
    doc.set_param("density", 0.4, 1)
    doc.set_param("lambda", 0.8)

    doc.set_method("linear")
    assert doc.params == {"normalize": False}
    assert [s.params for s in doc.slots] == [{"weight": 0.3}, {"weight": 0.7}]  # the base's weight comes back

    doc.set_method("ties")
    assert doc.params == {"normalize": False, "lambda": 0.8}
    assert [s.params for s in doc.slots] == [{}, {"weight": 0.7, "density": 0.4}]
    assert seen == ["method", "params", "params", "method", "method"]


def test_a_removed_setting_stays_removed_across_switches():
    doc = doc_with("ties", "base", "a")
    doc.set_param("density", 0.4, 1)
    doc.set_method("linear")
    doc.set_method("ties")
    assert doc.slots[1].params["density"] == 0.4
    doc.set_param("density", None, 1)
    doc.set_method("linear")
    doc.set_method("ties")
    assert "density" not in doc.slots[1].params


def test_clear_forgets_set_aside_settings():
    doc = doc_with("ties", "base", "a")
    doc.set_param("density", 0.4, 1)
    doc.set_method("linear")  # density set aside
    doc.clear()
    doc.add_model("/m/base", "base")
    doc.add_model("/m/a", "a")
    doc.set_method("ties")
    assert doc.slots[1].params == {"weight": 1.0}


def test_a_loaded_weight_on_the_base_can_be_removed_but_not_set():
    doc = RecipeDocument()
    doc.load_yaml(
        "models:\n  - model: /m/base\n    parameters: {weight: 0.5}\n  - model: /m/a\n    parameters: {weight: 1.0}\n"
        "merge_method: ties\nbase_model: /m/base\n"
    )
    assert doc.slots[0].params == {"weight": 0.5}  # loading never silently fixes a recipe
    with pytest.raises(RecipeError):
        doc.set_param("weight", 0.7, 0)
    doc.set_param("weight", None, 0)
    assert doc.slots[0].params == {}


def test_unknown_method_changes_nothing():
    doc = doc_with("ties", "base", "a")
    seen = recorder(doc)
    with pytest.raises(RecipeError, match="Unknown merge method 'tiez'.*'ties'"):
        doc.set_method("tiez")
    assert doc.method_name == "ties" and seen == []


def test_set_param_validates_name_and_scope():
    doc = doc_with("ties", "base", "a")
    seen = recorder(doc)
    with pytest.raises(RecipeError, match="'densty' is not a parameter of ties"):
        doc.set_param("densty", 0.5, 1)
    with pytest.raises(RecipeError, match="Parameter 'lambda' of ties is set for the recipe"):
        doc.set_param("lambda", 0.5, 1)
    with pytest.raises(RecipeError, match="Parameter 'density' of ties is set for each model"):
        doc.set_param("density", 0.5)
    assert seen == []
    gradient = [0.2, 0.8]
    doc.set_param("density", gradient, 1)
    gradient.append(1.0)  # the document keeps its own copy
    assert doc.slots[1].params["density"] == [0.2, 0.8]
    doc.set_param("density", None, 1)
    assert "density" not in doc.slots[1].params
    assert seen == ["params", "params"]


def test_param_value_falls_back_to_the_schema_default():
    doc = doc_with("ties", "base", "a")
    assert doc.param_value("normalize") is True  # ties default
    assert doc.param_value("density", 1) == 1.0
    assert doc.param_value("weight", 1) == 1.0  # the visible start value
    doc.set_param("weight", None, 1)
    assert doc.param_value("weight", 1) is None  # required and unset
    assert doc.param_value("nonsense") is None


def test_export_settings_and_out_dtype():
    doc = doc_with("linear", "a")
    seen = recorder(doc)
    doc.set_export(output="/out/merged", seed=7)
    doc.set_out_dtype("bfloat16")
    with pytest.raises(RecipeError, match="'colour' is not an export setting"):
        doc.set_export(shard_size="1GB", colour="red")
    assert doc.export.shard_size == "5GB"  # an unknown name changes nothing
    assert (doc.export.output, doc.export.seed, doc.out_dtype) == ("/out/merged", 7, "bfloat16")
    assert seen == ["export", "export"]


# ----------------------------------------------------------------------------- recipe and YAML


def test_to_yaml_is_mergekit_yaml_that_loads_back():
    doc = doc_with("ties", "base", "a", "b")
    doc.set_param("weight", [0.2, 0.8], 1)
    doc.set_param("density", [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}], 1)
    doc.set_param("weight", 0.5, 2)
    doc.set_param("lambda", 0.9)
    doc.set_out_dtype("float16")
    expected = {
        "models": [
            {"model": "/m/base"},
            {
                "model": "/m/a",
                "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
            },
            {"model": "/m/b", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "/m/base",
        "parameters": {"lambda": 0.9},
        "out_dtype": "float16",
    }
    text = doc.to_yaml()
    assert yaml.safe_load(text) == expected
    recipe = load_recipe("recipe.yaml", text=text)
    assert recipe.merge_method == "ties" and recipe.base_model == "/m/base"
    assert [(m.model, m.parameters) for m in recipe.models] == [(m["model"], m.get("parameters", {})) for m in expected["models"]]
    assert recipe.parameters == {"lambda": 0.9} and recipe.out_dtype == "float16"
    # to_recipe is a fresh object: changing it leaves the document alone
    fresh = doc.to_recipe()
    fresh.models[1].parameters["weight"] = 9
    assert doc.slots[1].params["weight"] == [0.2, 0.8]


def test_empty_document_has_no_yaml_and_no_recipe():
    doc = RecipeDocument()
    assert doc.to_yaml() == ""
    with pytest.raises(RecipeError, match="no models yet"):
        doc.to_recipe()


LOADED = """\
models:
  - model: /m/a
    parameters:
      weight: [0.1, 0.5, 0.9]
      density:
        - filter: mlp
          value: 0.4
        - value: 0.8
  - model: /m/b
    parameters:
      weight: 0.5
merge_method: dare_ties
base_model: /m/base
parameters:
  lambda: 1.2
  int8_mask: true
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
chat_template: chatml
"""


def test_load_yaml_lists_an_unlisted_base_and_keeps_every_field():
    doc = RecipeDocument()
    seen = recorder(doc)
    doc.load_yaml(LOADED, names={"/m/a": "Alpha"})
    assert seen == ["all"]
    assert doc.method_name == "dare_ties"
    assert [(s.ref, s.name) for s in doc.slots] == [("/m/a", "Alpha"), ("/m/b", "b"), ("/m/base", "base")]
    assert doc.base_index == 2
    assert doc.slots[0].params == {"weight": [0.1, 0.5, 0.9], "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]}
    assert doc.params == {"lambda": 1.2, "int8_mask": True}
    assert doc.out_dtype == "float16"
    assert yaml.safe_load(doc.to_yaml()) == {
        "models": [
            {"model": "/m/a", "parameters": {"weight": [0.1, 0.5, 0.9], "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]}},
            {"model": "/m/b", "parameters": {"weight": 0.5}},
            {"model": "/m/base"},
        ],
        "merge_method": "dare_ties",
        "base_model": "/m/base",
        "parameters": {"lambda": 1.2, "int8_mask": True},
        "dtype": "bfloat16",
        "out_dtype": "float16",
        "tokenizer_source": "base",
        "chat_template": "chatml",
    }


def test_load_yaml_with_a_listed_base_round_trips_exactly():
    data = {
        "models": [{"model": "/m/base"}, {"model": "/m/a", "parameters": {"weight": 0.7, "density": 0.5}}],
        "merge_method": "ties",
        "base_model": "/m/base",
        "parameters": {"normalize": False},
    }
    doc = RecipeDocument()
    doc.load_yaml(yaml.safe_dump(data, sort_keys=False))
    assert doc.base_index == 0
    assert yaml.safe_load(doc.to_yaml()) == data


SLICES = """\
slices:
  - sources:
      - model: /m/base
        layer_range: [0, 2]
      - model: /m/a
        layer_range: [0, 2]
  - sources:
      - model: /m/b
        layer_range: [2, 4]
merge_method: slerp
base_model: /m/base
parameters:
  t: [0.0, 1.0]
"""


def test_a_slices_recipe_is_kept_and_not_editable():
    doc = RecipeDocument()
    doc.load_yaml(SLICES)
    assert not doc.editable
    assert [s.ref for s in doc.slots] == ["/m/base", "/m/a", "/m/b"]
    seen = recorder(doc)
    for call, args in [
        ("add_model", ("/m/c",)),
        ("remove_slot", (0,)),
        ("move_slot", (0, 1)),
        ("set_base", (1,)),
        ("set_method", ("linear",)),
        ("set_param", ("t", 0.3)),
    ]:
        with pytest.raises(RecipeError, match="slices"):
            getattr(doc, call)(*args)
    assert seen == []
    doc.set_out_dtype("bfloat16")  # export settings still apply
    out = yaml.safe_load(doc.to_yaml())
    assert out["slices"] == [
        {"sources": [{"model": "/m/base", "layer_range": [0, 2]}, {"model": "/m/a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "/m/b", "layer_range": [2, 4]}]},
    ]
    assert (out["merge_method"], out["base_model"], out["parameters"], out["out_dtype"]) == (
        "slerp", "/m/base", {"t": [0.0, 1.0]}, "bfloat16")
    assert "models" not in out
    # loading a models: recipe makes it editable again
    doc.load_yaml(LOADED)
    assert doc.editable


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models: [\n  - model: a\n", "not valid YAML"),
        ("merge_method: linear\nmodels:\n  - model: /m/x\nmodles: []\n", "unknown field 'modles'"),
        ("merge_method: tiez\nmodels:\n  - model: /m/x\n", "Unknown merge method 'tiez'"),
        ("merge_method: linear\n", "exactly one of 'models:' or 'slices:'"),
    ],
)
def test_bad_yaml_raises_and_leaves_the_document_unchanged(text, fragment):
    doc = doc_with("ties", "base", "a")
    doc.set_param("density", 0.5, 1)
    before = doc.to_yaml()
    seen = recorder(doc)
    with pytest.raises(RecipeError) as info:
        doc.load_yaml(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert doc.to_yaml() == before and doc.base_index == 0 and seen == []


def test_state_round_trip_includes_names_and_export(tmp_path):
    doc = doc_with("ties", "base", "a")
    doc.slots[1].name = "my fine-tune"
    doc.set_param("density", 0.3, 1)
    doc.set_export(output=str(tmp_path / "out"), shard_size="2GB", model_card=False, device="cpu", seed=11, overwrite=True)
    doc.set_out_dtype("bfloat16")
    doc.source_path = tmp_path / "recipe.yaml"
    state = doc.to_state()

    other = RecipeDocument()
    seen = recorder(other)
    other.restore_state(state)
    assert "all" in seen and seen[-1] == "export"
    assert other.method_name == "ties" and other.base_index == 0
    assert [(s.ref, s.name, s.params) for s in other.slots] == [
        ("/m/base", "base", {}),
        ("/m/a", "my fine-tune", {"weight": 1.0, "density": 0.3}),
    ]
    assert (other.export.output, other.export.shard_size, other.export.model_card) == (str(tmp_path / "out"), "2GB", False)
    assert (other.export.device, other.export.seed, other.export.overwrite) == ("cpu", 11, True)
    assert other.out_dtype == "bfloat16"
    assert other.source_path == tmp_path / "recipe.yaml"


def test_restore_of_a_broken_state_changes_nothing():
    doc = doc_with("linear", "a")
    doc.set_export(seed=3)
    before = doc.to_state()
    seen = recorder(doc)
    with pytest.raises(RecipeError):
        doc.restore_state({"yaml": "merge_method: [unclosed", "export": {"seed": 99}})
    with pytest.raises(RecipeError, match="Unknown merge method"):
        doc.restore_state({"yaml": "merge_method: tiez\nmodels:\n  - model: /m/x\n", "export": {"seed": 99}})
    assert doc.to_state() == before and doc.export.seed == 3
    assert seen == []


def test_restoring_an_empty_state_clears_the_recipe():
    doc = doc_with("ties", "base", "a")
    doc.restore_state({"yaml": "", "export": {"seed": 5}})
    assert doc.slots == [] and doc.method_name == "linear" and doc.export.seed == 5


# ----------------------------------------------------------------------------- check on tiny models


def build(method: str, family: dict[str, Path]) -> RecipeDocument:
    """The recipe a person would click together: only the document API."""
    doc = RecipeDocument()
    doc.set_method(method)
    base, a, b = (str(family[k]) for k in ("base", "a", "b"))
    if method == "linear":
        doc.add_model(a)
        doc.add_model(b)
        doc.set_param("weight", 0.6, 0)
        doc.set_param("weight", 0.4, 1)
    elif method == "slerp":
        doc.add_model(base)
        doc.add_model(a)
        doc.set_param("t", [0.0, 0.5, 1.0])
    else:
        for ref in (base, a, b):
            doc.add_model(ref)
        if method != "model_stock":
            doc.set_param("weight", 0.5, 1)
            doc.set_param("weight", [0.2, 0.6], 2)
        if method in ("ties", "dare_ties"):
            doc.set_param("density", 0.5, 1)
            doc.set_param("density", [{"filter": "mlp", "value": 0.3}, {"value": 0.8}], 2)
    return doc


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "task_arithmetic", "dare_ties", "model_stock"])
def test_check_accepts_the_document_recipe(method, arch, request):
    family = request.getfixturevalue(f"{arch}_family")
    doc = build(method, family)
    plan = merge.check(doc.to_recipe())
    try:
        assert plan.method.name == method
        assert [m.ref for m in plan.models] == [s.ref for s in doc.slots]
        assert plan.recipe.base_model == (None if method == "linear" else str(family["base"]))
        assert plan.ops
    finally:
        plan.close()


# ----------------------------------------------------------------------------- the formula line


def test_formula_of_an_empty_document():
    assert RecipeDocument().formula() == "Add models from the library to build a recipe."


@pytest.mark.parametrize("weights", [(0.7, 0.3), (7, 3)])
def test_linear_formula_shows_normalised_shares(weights):
    doc = doc_with("linear", "a", "b")
    doc.set_param("weight", weights[0], 0)
    doc.set_param("weight", weights[1], 1)
    assert doc.formula() == "0.70 × a + 0.30 × b"


def test_linear_formula_without_normalize_shows_the_weights():
    doc = doc_with("linear", "a", "b")
    doc.set_param("weight", 7, 0)
    doc.set_param("weight", 3, 1)
    doc.set_param("normalize", False)
    assert doc.formula() == "7.00 × a + 3.00 × b"


def test_linear_formula_with_weights_summing_to_zero():
    doc = doc_with("linear", "a", "b")
    doc.set_param("weight", 1.0, 0)
    doc.set_param("weight", -1.0, 1)
    assert "sum to zero" in doc.formula()
    doc.set_param("normalize", False)
    assert doc.formula() == "1.00 × a + -1.00 × b"


def test_linear_formula_shows_gradients_as_ranges():
    doc = doc_with("linear", "a", "b")
    doc.set_param("weight", [0.2, 0.5, 0.8], 0)
    doc.set_param("weight", 0.5, 1)
    assert doc.formula() == "(0.20→0.80 over layers × a + 0.50 × b) ÷ sum of weights"
    doc.set_param("weight", [{"filter": "mlp", "value": 0.1}, {"value": 0.9}], 1)
    assert doc.formula() == "(0.20→0.80 over layers × a + per tensor type × b) ÷ sum of weights"


def test_slerp_formula_names_the_ends_and_the_shares():
    doc = doc_with("slerp", "base", "chat")
    doc.set_param("t", 0.3)
    assert doc.formula() == "SLERP from base (t = 0) to chat (t = 1) at t = 0.30: about 70 % base, 30 % chat"
    doc.set_base(1)  # the direction follows the base
    assert doc.formula() == "SLERP from chat (t = 0) to base (t = 1) at t = 0.30: about 70 % chat, 30 % base"
    doc.set_param("t", [0.0, 1.0])
    assert doc.formula() == "SLERP from chat (t = 0) to base (t = 1), t = 0.00→1.00 over layers"
    doc.add_model("/m/third", "third")
    assert "exactly two models" in doc.formula()


def test_task_arithmetic_formula_shows_weighted_deltas_and_lambda():
    doc = doc_with("task_arithmetic", "base", "a", "b")
    doc.set_param("weight", 0.5, 1)
    doc.set_param("weight", 0.3, 2)
    assert doc.formula() == "Task Arithmetic: base + [0.50 × (a − base) + 0.30 × (b − base)]"
    doc.set_param("lambda", 0.8)
    assert doc.formula() == "Task Arithmetic: base + 0.80 × [0.50 × (a − base) + 0.30 × (b − base)]"


def test_ties_formula_notes_normalisation_and_density():
    doc = doc_with("ties", "base", "a", "b")
    doc.set_param("weight", 0.5, 1)
    doc.set_param("density", 0.4, 1)
    doc.set_param("density", 0.6, 2)
    text = doc.formula()
    assert text.startswith("TIES: base + [0.50 × (a − base) + 1.00 × (b − base)] ÷ sum of weights — ")
    assert text.endswith("density 0.40, 0.60")
    doc.set_base(None)
    assert doc.formula() == "TIES needs a base model: mark one model as base."


def test_nuslerp_formula_t_is_the_second_weights_share():
    doc = doc_with("nuslerp", "a", "b")
    doc.set_param("weight", 1.0, 0)
    doc.set_param("weight", 3.0, 1)
    assert doc.formula() == "NuSLERP from a (t = 0) to b (t = 1) at t = 0.75: about 25 % a, 75 % b"
    doc.add_model("/m/base", "base", as_base=True)
    assert doc.formula() == (
        "NuSLERP from a (t = 0) to b (t = 1) at t = 0.75 as task vectors from base: about 25 % a, 75 % b"
    )


def test_generic_formula_names_every_model():
    doc = doc_with("model_stock", "base", "a", "b")
    assert doc.formula() == "Model Stock(Base (base), B (a), C (b), filter_wise = false)"
    doc = doc_with("karcher", "x", "y")
    assert doc.formula() == "Karcher Mean(A (x), B (y), max_iter = 10, tol = 1e-05)"


def test_formula_of_a_slices_recipe_points_to_the_yaml():
    doc = RecipeDocument()
    doc.load_yaml(SLICES)
    assert doc.formula() == "SLERP over layer slices of base, a, b (see the YAML)."


# ----------------------------------------------------------------------------- light imports


def test_document_formula_and_preflight_import_without_torch():
    code = (
        "import sys, core.merge.document, core.merge.formula, core.merge.preflight; "
        "print(sorted(m for m in ('torch', 'transformers', 'PySide6', 'pyqtgraph', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
