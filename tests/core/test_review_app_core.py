"""Review of the app's engine pieces (issue 4): each test pins down a defect that was found and fixed."""

from __future__ import annotations

from core.merge.document import RecipeDocument


def _ties(*refs: str) -> RecipeDocument:
    doc = RecipeDocument()
    doc.set_method("ties")
    for ref in refs:
        doc.add_model(ref)
    return doc


def test_marking_another_base_and_back_keeps_the_models_settings():
    doc = _ties("/m/base", "/m/a", "/m/b")
    assert doc.base_index == 0
    doc.set_param("weight", 0.3, 1)
    doc.set_param("density", 0.6, 1)
    doc.set_base(1)  # a slip: the fine-tune marked as base, which takes no weight or density
    assert doc.slot_parameters(1) == [] and doc.slots[1].params == {}
    assert "weight:" not in doc.to_yaml().split("- model: /m/a")[1].split("- model:")[0]
    doc.set_base(0)  # and back: what the user set is there again, not the start values
    assert doc.slots[1].params == {"weight": 0.3, "density": 0.6}
    assert doc.slots[0].params == {}


def test_a_setting_removed_on_purpose_is_not_brought_back_by_a_base_change():
    doc = _ties("/m/base", "/m/a")
    doc.set_param("density", 0.6, 1)
    doc.set_base(1)
    doc.set_base(0)
    doc.set_param("density", None, 1)  # removed by the user
    doc.set_base(None)
    doc.set_base(0)
    assert "density" not in doc.slots[1].params


def test_a_base_change_then_a_method_switch_keeps_the_settings():
    doc = _ties("/m/base", "/m/a")
    doc.set_param("weight", 0.3, 1)
    doc.set_base(1)
    doc.set_method("dare_ties")
    doc.set_base(0)
    assert doc.slots[1].params["weight"] == 0.3
