"""The recipe editor's live preflight: a report the app shows as it is."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors import safe_open

from core.merge.document import RecipeDocument
from core.merge.preflight import PreflightReport, preflight
from tests.fixtures.tiny_models import make_shape_mismatch

PLENTY = 1 << 50  # bytes of free memory no tiny merge comes near


@pytest.fixture(autouse=True)
def plenty_of_memory(monkeypatch):
    """Free memory is whatever the test says, not what the machine happens to have."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=PLENTY))


@pytest.fixture(scope="module")
def shape_mismatch(llama_family, tmp_path_factory):
    return make_shape_mismatch(llama_family["base"], tmp_path_factory.mktemp("preflight") / "tiny-llama-shape")


def ties(*refs) -> RecipeDocument:
    doc = RecipeDocument()
    doc.set_method("ties")
    for ref in refs:
        doc.add_model(str(ref))
    for i in range(1, len(refs)):
        doc.set_param("density", 0.5, i)
    return doc


def tensor_names(model: Path) -> list[str]:
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def assert_one_sentence(report: PreflightReport) -> None:
    assert not report.ok
    assert report.problem and "\n" not in report.problem and report.problem.endswith(".")
    assert report.text == "" and report.models == {}


def test_a_good_recipe_gives_an_ok_report_with_its_figures(llama_family, tmp_path):
    refs = [str(llama_family[k]) for k in ("base", "a", "b")]
    report = preflight(ties(*refs).to_recipe(), tmp_path / "merged")
    assert report.ok and report.problem is None and report.problem_refs == []
    assert report.warnings == []
    config = json.loads((llama_family["base"] / "config.json").read_text())
    assert report.layer_count == config["num_hidden_layers"] == 4
    assert report.filters == (("self_attn",), ("mlp",))
    summary = report.summary
    assert summary["method"] == "ties"
    assert summary["tensors"] == len(tensor_names(llama_family["base"]))
    assert [m["ref"] for m in summary["models"]] == refs
    assert summary["output_bytes"] > 0 and summary["peak_memory_bytes"] > 0
    assert report.text.startswith("Recipe") and "TIES" in report.text
    assert list(report.models) == refs
    for ref in refs:
        facts = report.models[ref]
        assert facts["path"] == ref
        assert facts["architecture"] == config["architectures"][0] == "LlamaForCausalLM"
        assert facts["layers"] == 4
    try:
        from core.io.catalog import header_hash
    except ImportError:  # pragma: no cover - older catalogs have no fingerprint
        return
    for ref in refs:
        assert report.models[ref]["header_hash"] == header_hash(ref)
        assert len(report.models[ref]["header_hash"]) == 40


def test_gpt2_filters_are_detected(gpt2_family):
    report = preflight(ties(gpt2_family["base"], gpt2_family["a"]).to_recipe())
    assert report.ok
    assert report.filters == (("attn",), ("mlp",))
    assert report.models[str(gpt2_family["base"])]["architecture"] == "GPT2LMHeadModel"


def test_a_missing_model_is_named(llama_family, tmp_path):
    missing = tmp_path / "no-such-model"
    report = preflight(ties(llama_family["base"], missing).to_recipe())
    assert_one_sentence(report)
    assert str(missing) in report.problem
    assert report.problem_refs == [str(missing)]


def test_a_model_whose_name_contains_another_ref_does_not_name_it(llama_family):
    """'tiny-llama-a-instruct' missing must not mark 'tiny-llama-a' as the problem too."""
    present = str(llama_family["a"])
    missing = present + "-instruct"
    report = preflight(ties(llama_family["base"], present, missing).to_recipe())
    assert_one_sentence(report)
    assert report.problem_refs == [missing]


def test_different_shapes_name_the_tensor(llama_family, shape_mismatch):
    report = preflight(ties(llama_family["base"], shape_mismatch.path).to_recipe())
    assert_one_sentence(report)
    assert shape_mismatch.tensor in report.problem
    assert str(shape_mismatch.path) in report.problem_refs


def test_an_output_folder_that_is_not_empty_needs_replace(llama_family, tmp_path):
    recipe = ties(llama_family["base"], llama_family["a"]).to_recipe()
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("earlier merge")
    report = preflight(recipe, output)
    assert_one_sentence(report)
    assert str(output) in report.problem
    assert "'Replace existing output'" in report.problem and "--overwrite" not in report.problem
    report = preflight(recipe, output, overwrite=True)
    assert report.ok
    assert (output / "keep.txt").read_text() == "earlier merge"  # a check never touches the folder


def test_an_empty_output_folder_is_fine(llama_family, tmp_path):
    (tmp_path / "merged").mkdir()
    assert preflight(ties(llama_family["base"], llama_family["a"]).to_recipe(), tmp_path / "merged").ok


def test_an_output_whose_parent_does_not_exist(llama_family, tmp_path):
    output = tmp_path / "nowhere" / "merged"
    report = preflight(ties(llama_family["base"], llama_family["a"]).to_recipe(), output)
    assert_one_sentence(report)
    assert str(tmp_path / "nowhere") in report.problem and "does not exist" in report.problem
    assert report.problem_refs == []
    assert not (tmp_path / "nowhere").exists()


def test_a_recipe_error_is_reported_not_raised(llama_family):
    doc = ties(llama_family["base"], llama_family["a"])
    doc.set_param("density", 1.5, 1)
    report = preflight(doc.to_recipe())
    assert_one_sentence(report)
    assert "density" in report.problem


def test_memory_warning_when_the_estimate_exceeds_free_memory(llama_family, monkeypatch):
    recipe = ties(llama_family["base"], llama_family["a"], llama_family["b"]).to_recipe()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    report = preflight(recipe)
    assert report.ok  # a warning, not a refusal
    assert len(report.warnings) == 1
    peak_gb = f"{report.summary['peak_memory_bytes'] / 1e9:.2f} GB"
    assert peak_gb in report.warnings[0] and "0.00 GB is free" in report.warnings[0]


def test_no_memory_warning_when_memory_cannot_be_queried(llama_family, monkeypatch):
    def refuse():
        raise PermissionError("sandboxed")

    monkeypatch.setattr(psutil, "virtual_memory", refuse)
    report = preflight(ties(llama_family["base"], llama_family["a"]).to_recipe())
    assert report.ok and report.warnings == []


def test_filters_come_from_the_models_even_when_the_check_fails(gpt2_family, tmp_path):
    """The curve editor must write GPT-2's 'attn' filter even while the recipe has a problem elsewhere."""
    recipe = ties(gpt2_family["base"], gpt2_family["a"]).to_recipe()
    output = tmp_path / "taken"
    output.mkdir()
    (output / "x").write_text("")
    report = preflight(recipe, output)  # fails after planning: the output folder
    assert not report.ok and report.filters == (("attn",), ("mlp",))
    recipe.merge_method = "slerp"  # fails while planning (no t): filters from the first model that opens
    recipe.models = [type(recipe.models[0])("/no/such/model")] + recipe.models
    report = preflight(recipe)
    assert not report.ok and report.filters == (("attn",), ("mlp",))
