"""Review of the Tokens panel's engine (issue 7): each test pins down a defect that was found and fixed.

A measured result keeps its options as they were given: an ``(r, inflection)``
pair is a tuple for ``core.tokens.apply`` and a list is one r per layer, so a
result (or its Python line) that turned the pair into a list applied another
schedule, or none.
"""

from __future__ import annotations

import json

import pytest
import torch

from core.jobs import drive
from core.tokens import lab, tiny

FAST = {"runs": 1, "warmup": 0}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The small random ViT (32 px, 8 px patches: 17 tokens, 3 layers)."""
    folder = tmp_path_factory.mktemp("review-lab") / "vit"
    tiny.build("vit", size="small").model.save_pretrained(folder)
    return lab.load_model(folder)


@pytest.mark.parametrize("pair", [(4, -0.5), (2, 1)])
def test_a_schedule_pair_stays_a_pair_in_the_result_and_its_python_line(vit, pair):
    import core  # noqa: F401 - the Python line expects ``core`` imported
    import core.tokens  # noqa: F401

    work = lab.make_workload(vit, lab.LabInput())
    result = drive(lab.iter_evaluate(vit, work, "tome", {"r": pair}, **FAST))
    assert result.options["r"] == pair and isinstance(result.options["r"], tuple)
    line = lab.python_line(result.method, result.options)
    model = vit.model  # noqa: F841 - the name the line uses
    handle = eval(line)  # the line a person copies
    try:
        with torch.inference_mode():
            work.forward()
        assert handle.stats["tokens_per_layer"] == result.tokens_per_layer
    finally:
        handle.remove()
    # The JSON summary for the session still holds plain JSON.
    assert json.loads(json.dumps(result.figures()))["options"]["r"] == list(pair)


def test_sweep_results_keep_the_pair_too(vit):
    work = lab.make_workload(vit, lab.LabInput())
    results = drive(lab.iter_sweep(vit, work, "tome", {"prop_attn": True}, "r", [(2, -1.0), 2], **FAST))
    assert [r.options["r"] for r in results] == [(2, -1.0), 2]
    assert results[0].tokens_per_layer == [17, 13, 11]  # 4, 2, 0 merged: the decreasing schedule
