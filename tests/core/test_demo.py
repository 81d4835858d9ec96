"""The first-run demo family: three tiny random Llama-style models built locally.

They load offline with transformers and generate, merge with core.merge.run,
are deterministic, are reused when complete, are written atomically (a
cancelled build leaves nothing half-written), and bad destinations give one
sentence.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import core.demo as demo
import core.merge as merge
from core.errors import CancelledError, MergeStudioError
from core.jobs import CancelToken, drive


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return demo.make_demo_family(tmp_path_factory.mktemp("demo"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


def test_the_family_loads_and_generates_with_transformers(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert [p.name for p in family] == list(demo.DEMO_NAMES)
    prompt = "Hello world, how are you today?"
    for folder in family:
        assert sorted(p.name for p in folder.iterdir()) == sorted(demo.FILES)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 4
        assert len(tokenizer) == model.config.vocab_size == 512
        inputs = tokenizer(prompt, return_tensors="pt")
        assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id == 1
        assert tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True) == prompt
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert "random demo model" in (folder / "README.md").read_text()


def test_variants_are_the_base_plus_a_low_rank_change(family):
    base, chat, code = (weights(p) for p in family)
    assert base.keys() == chat.keys() == code.keys()
    name = "model.layers.1.mlp.up_proj.weight"
    for variant in (chat, code):
        delta = variant[name] - base[name]
        relative = (delta.norm() / base[name].norm()).item()
        assert 0.01 < relative < 0.2  # close to the base, but not equal
        singular = torch.linalg.svdvals(delta)
        top = (singular[: demo.DELTA_RANK] ** 2).sum() / (singular**2).sum()
        assert top > 0.8  # most of the change lies in a rank-4 subspace
        assert torch.equal(variant["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(chat[name], code[name])


def test_the_family_merges(family, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = merge.run(path, tmp_path / "merged", device="cpu")
    assert result.tensors == len(weights(family[0]))
    merged = weights(tmp_path / "merged")
    name = "model.layers.0.self_attn.q_proj.weight"
    states = [weights(p) for p in family]
    expected = sum(s[name] for s in states) / 3
    assert torch.allclose(merged[name], expected, atol=1e-2)  # stored as bf16
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=2, min_new_tokens=2).shape == (1, 5)


def test_a_complete_family_is_reused(family, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo family was rebuilt")

    monkeypatch.setattr(demo, "_write_model", refuse)
    before = [(p / "model.safetensors").stat().st_mtime_ns for p in family]
    steps = []
    assert drive(demo.iter_make_demo_family(family[0].parent), steps.append) == family
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in family] == before
    assert len(steps) == 1 and "reused" in steps[0].message


def test_building_is_deterministic_and_completes_a_partial_family(family, tmp_path):
    import shutil

    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(family[0], again / "demo-base")  # base already there: only the variants are built
    paths = demo.make_demo_family(again)
    for original, rebuilt in zip(family, paths):
        assert (original / "model.safetensors").read_bytes() == (rebuilt / "model.safetensors").read_bytes()
        assert (original / "tokenizer.json").read_text() == (rebuilt / "tokenizer.json").read_text()
    assert not [p for p in again.iterdir() if p.name.startswith(".")]


def test_cancelling_leaves_no_half_written_model(tmp_path):
    cancel = CancelToken()

    def stop_after_first(progress):
        cancel.cancel()

    root = tmp_path / "demo"
    with pytest.raises(CancelledError):
        drive(demo.iter_make_demo_family(root), stop_after_first, cancel)
    assert sorted(p.name for p in root.iterdir()) == ["demo-base"]  # no demo-chat, no .partial folder


def test_bad_destinations_are_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MergeStudioError) as info:
        demo.make_demo_family(tmp_path / "a-file" / "demo")
    message = str(info.value)
    assert str(tmp_path / "a-file" / "demo") in message and "\n" not in message

    occupied = tmp_path / "occupied"
    (occupied / "demo-chat").mkdir(parents=True)
    (occupied / "demo-chat" / "notes.txt").write_text("mine")
    with pytest.raises(MergeStudioError, match="not a complete Merge Studio demo model"):
        demo.make_demo_family(occupied)
    assert (occupied / "demo-chat" / "notes.txt").read_text() == "mine"
    assert not (occupied / "demo-base").exists()  # refused before anything was written


def test_default_folder_is_in_the_app_home(fresh_home):
    assert demo.default_demo_dir() == fresh_home / "demo-models"


def test_config_matches_the_weights(family):
    config = json.loads((family[0] / "config.json").read_text())
    state = weights(family[0])
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    kv = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert state["model.layers.3.self_attn.k_proj.weight"].shape == (kv, config["hidden_size"])
    assert f"model.layers.{config['num_hidden_layers']}.mlp.up_proj.weight" not in state


def test_importing_the_library_modules_stays_cheap():
    heavy = "{'torch', 'transformers', 'tokenizers', 'safetensors'}"
    code = f"import sys, core.demo, core.library, core.library_cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
