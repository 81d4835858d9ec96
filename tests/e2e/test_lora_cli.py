"""``mergestudio lora merge|combine|extract|show`` end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.cli import main
from tests.fixtures.tiny_models import read_state_dict

PREFIX = "base_model.model."


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def adapter(folder: Path, modules: list[str], r: int = 2, alpha: float = 4, seed: int = 0, width: int = 64) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        state[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, width, generator=gen) * 0.1
        state[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(width, r, generator=gen) * 0.1
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture()
def two_adapters(tmp_path) -> tuple[Path, Path]:
    return (adapter(tmp_path / "a1", ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.o_proj"], seed=1),
            adapter(tmp_path / "a2", ["model.layers.0.self_attn.q_proj"], r=3, alpha=3, seed=2))


def test_merge_prints_what_it_did_and_writes_the_formula(capsys, llama_family, two_adapters, tmp_path):
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(capsys, "lora", "merge", llama_family["base"], f"{two_adapters[0]}:0.5", two_adapters[1],
                                   "-o", out)
    assert code == 0, stderr
    assert stdout.startswith("Merged 3 LoRA modules into 2 of ") and str(out) in stdout
    base, merged = read_state_dict(llama_family["base"]), read_state_dict(out)
    from core.lora import open_lora

    name = "model.layers.0.self_attn.q_proj.weight"
    first, second = open_lora(two_adapters[0]), open_lora(two_adapters[1])
    module = "model.layers.0.self_attn.q_proj"
    want = base[name] + 0.5 * first.delta(first.modules[module]) + second.delta(second.modules[module])
    torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    code, stdout, _ = run_cli(capsys, "lora", "merge", llama_family["base"], two_adapters[0], "-o", out,
                              "--overwrite", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["changed"] == 2 and summary["files"] == ["model.safetensors"]


def test_extract_then_show(capsys, llama_family, tmp_path):
    out = tmp_path / "adapter"
    code, stdout, stderr = run_cli(capsys, "lora", "extract", llama_family["base"], llama_family["a"], "-o", out,
                                   "--rank", 4, "--modules", r"layers\.0\.", "--device", "cpu")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith(f"Extracted 7 modules (peft) into {out}: rank 4; reconstruction error median ")
    assert "Changed but not in the LoRA (2 tensors" in stdout and "model.layers.0.input_layernorm.weight" in stdout
    code, stdout, _ = run_cli(capsys, "lora", "show", out)
    assert code == 0 and stdout.startswith(f"{out}: peft LoRA, 7 modules (model), rank 4, scale alpha/r = 1")
    code, stdout, _ = run_cli(capsys, "lora", "show", out, "--json")
    info = json.loads(stdout)
    assert info["format"] == "peft" and info["ranks"] == [4] and info["dtypes"] == ["F32"]
    code, stdout, _ = run_cli(capsys, "lora", "extract", llama_family["base"], llama_family["a"], "-o", tmp_path / "e",
                              "--energy", 0.5, "--modules", "mlp", "--json", "--device", "cpu")
    result = json.loads(stdout)
    assert code == 0 and len(result["modules"]) == 12 and all(m["svd"] == "exact" for m in result["modules"])
    assert all(m["error"] ** 2 <= 0.5 * m["norm"] ** 2 * (1 + 1e-5) for m in result["modules"])


def test_combine(capsys, two_adapters, tmp_path):
    out = tmp_path / "combined"
    code, stdout, stderr = run_cli(capsys, "lora", "combine", *two_adapters, "--weights", "1,0.5", "-o", out)
    assert code == 0, stderr
    assert "by linear" in stdout and "exact: the ranks are concatenated" in stdout and "rank 2–5" in stdout
    code, stdout, stderr = run_cli(capsys, "lora", "combine", *two_adapters, "--method", "ties", "--density", "0.5",
                                   "--rank", "2", "-o", tmp_path / "ties", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["method"] == "ties" and set(summary["ranks"].values()) == {2}
    assert (tmp_path / "ties" / "adapter_config.json").is_file()


def test_errors_are_one_line_and_write_nothing(capsys, llama_family, gpt2_family, tmp_path):
    wrong = adapter(tmp_path / "gpt2-lora", ["transformer.h.0.attn.c_proj"])
    code, stdout, stderr = run_cli(capsys, "lora", "merge", llama_family["base"], wrong, "-o", tmp_path / "out")
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("mergestudio: error: LoRA ")
    assert "key 'base_model.model.transformer.h.0.attn.c_proj.lora_A.weight' matches no module" in stderr
    code, _, stderr = run_cli(capsys, "lora", "combine", wrong, "--method", "dare_ties", "-o", tmp_path / "c")
    assert code == 1 and "give --rank or --energy" in stderr and stderr.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["lora", "extract", str(llama_family["base"]), str(llama_family["a"]), "-o", str(tmp_path / "e")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "one of the arguments --rank --energy is required" in stderr
    code, _, stderr = run_cli(capsys, "lora", "show", tmp_path / "missing.safetensors")
    assert code == 1 and "no such file or folder" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-lora"]
