"""Combining LoRAs: linear is exact by concatenating ranks; TIES and DARE follow the engine.

References are written out here: the weighted sum of the updates, TIES
(trim to the top-k magnitudes, elect the sign of the sum, average the agreeing
entries by their weights) and the best rank-R approximation by a float64 SVD.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import MergeStudioError, ModelError
from core.lora import combine_loras, merge_lora, open_lora
from tests.core.test_lora_sd import C0, C1, H, delta, kohya_lora, sd1_checkpoint

A_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, C0, (C0,)),
    "lora_unet_up_blocks_0_upsamplers_0_conv": (3, C1, (C1, 3, 3)),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (2, 2 * H, (H,)),
}
B_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (2, C0, (C0,)),
    "lora_unet_up_blocks_0_upsamplers_0_conv": (2, C1, (C1, 3, 3)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (2, 8 * C1, (C1,)),
}
SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (C0, C0),
    "lora_unet_up_blocks_0_upsamplers_0_conv": (C1, C1, 3, 3),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (2 * H, H),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (8 * C1, C1),
}


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    return (kohya_lora(tmp_path / "a.safetensors", A_MODULES, seed=1, alpha=2.0),
            kohya_lora(tmp_path / "b.safetensors", B_MODULES, seed=2, alpha=1.0))


def updates(path: Path) -> dict[str, torch.Tensor]:
    lora = load_file(path)
    stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    return {s: delta(lora, s, SHAPES[s]) for s in stems}


def weighted_sum(paths, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(paths, weights):
        for stem, d in updates(path).items():
            total[stem] = total.get(stem, torch.zeros(SHAPES[stem])) + w * d
    return total


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    flat = matrix.reshape(matrix.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(matrix.shape)


def test_linear_is_exact_and_concatenates_ranks(pair, tmp_path):
    out = tmp_path / "ab.safetensors"
    result = combine_loras(list(pair), out, weights=[0.7, -0.4])
    assert result.exact and result.format == "kohya"
    assert result.ranks == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 6,
        "lora_unet_up_blocks_0_upsamplers_0_conv": 5,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": 2,
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": 2,
    }
    want = weighted_sum(pair, [0.7, -0.4])
    got = updates(out)
    assert got.keys() == want.keys()
    for stem in want:
        torch.testing.assert_close(got[stem], want[stem], rtol=0, atol=1e-6)
    # Merging the combination equals merging both at those strengths.
    ckpt = sd1_checkpoint(tmp_path / "sd1.safetensors", dtype=torch.float32)
    merge_lora(ckpt, [out], tmp_path / "one.safetensors")
    merge_lora(ckpt, [(pair[0], 0.7), (pair[1], -0.4)], tmp_path / "two.safetensors")
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-6)


def test_linear_with_a_rank_is_the_best_approximation_of_the_sum(pair, tmp_path):
    out = tmp_path / "r2.safetensors"
    result = combine_loras(list(pair), out, rank=2)
    assert not result.exact and set(result.ranks.values()) == {2}
    want = weighted_sum(pair, [1.0, 1.0])
    for stem, got in updates(out).items():
        torch.testing.assert_close(got.double(), best_rank(want[stem], 2), rtol=0, atol=1e-5)


def _ties_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on task vectors from a zero base, written out (Yadav et al. 2023, as mergekit normalizes)."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        flat = d.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        trimmed.append((flat * keep).reshape(d.shape))
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed)])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == sign
    w = torch.tensor(weights).reshape(-1, *([1] * deltas[0].dim()))
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def test_ties_trims_elects_and_refactors(pair, tmp_path):
    out = tmp_path / "ties.safetensors"
    weights, density = [1.0, 0.6], 0.5
    result = combine_loras(list(pair), out, method="ties", weights=weights, density=density, rank=3)
    assert set(result.ranks.values()) == {3}
    per_lora = [updates(p) for p in pair]
    got = updates(out)
    for stem, shape in SHAPES.items():
        deltas = [u.get(stem, torch.zeros(shape)).reshape(shape[0], -1) for u in per_lora]
        merged = _ties_reference(deltas, weights, density).reshape(shape)
        torch.testing.assert_close(got[stem].double(), best_rank(merged, 3), rtol=0, atol=1e-5)
        flat = merged.reshape(shape[0], -1)
        residual = torch.linalg.matrix_norm(flat - best_rank(merged, 3).float().reshape(shape[0], -1))
        assert result.errors[stem] == pytest.approx(float(residual / torch.linalg.matrix_norm(flat)), rel=1e-3)


def test_dare_drops_by_seed_and_keeps_the_sum_at_density_one(pair, tmp_path):
    rank = min(min(shape[0], math.prod(shape[1:])) for shape in SHAPES.values())  # 8
    kept = tmp_path / "d1.safetensors"
    combine_loras(list(pair), kept, method="dare_linear", density=1.0, rank=rank)
    want = weighted_sum(pair, [1.0, 1.0])
    for stem, got in updates(kept).items():
        torch.testing.assert_close(got.double(), best_rank(want[stem], rank), rtol=0, atol=1e-5)
    runs = {}
    for name, seed in (("s0", 0), ("s0-again", 0), ("s1", 1)):
        out = tmp_path / f"{name}.safetensors"
        combine_loras(list(pair), out, method="dare_ties", density=0.5, rank=rank, seed=seed)
        runs[name] = load_file(out)
    assert all(torch.equal(runs["s0"][k], runs["s0-again"][k]) for k in runs["s0"])
    assert any(not torch.equal(runs["s0"][k], runs["s1"][k]) for k in runs["s0"] if k.endswith("weight"))
    # At full rank the dense result comes back: entries dropped from both LoRAs are zero (about a quarter).
    out = tmp_path / "full.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    combine_loras(list(pair), out, method="dare_linear", density=0.5, rank=C0)
    dense = updates(out)[stem]
    zeros = float((dense.abs() < 1e-6).float().mean())
    assert 0.1 < zeros < 0.45


def test_peft_adapters_combine_into_an_adapter_peft_loads(llama_family, tmp_path):
    import peft
    import transformers

    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.{}.self_attn.{}"
    paths = []
    for i, (r, alpha, layers) in enumerate(((2, 4, (0, 1)), (3, 3, (1,)))):
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        state = {}
        for layer in layers:
            key = prefix.format(layer, "q_proj")
            state[f"{key}.lora_A.weight"] = torch.randn(r, 64, generator=gen) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(64, r, generator=gen) * 0.1
        save_file(state, str(folder / "adapter_model.safetensors"))
        paths.append(folder)
    out = tmp_path / "combined"
    result = combine_loras(paths, out, weights=[1.0, 0.5])
    assert result.format == "peft"
    assert result.ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 5}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] in (2, 5) and len(config["rank_pattern"]) == 1
    base_model = transformers.AutoModelForCausalLM.from_pretrained(llama_family["base"])
    merged = peft.PeftModel.from_pretrained(base_model, out).merge_and_unload().state_dict()
    base = load_file(llama_family["base"] / "model.safetensors")
    for layer in (0, 1):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        want = base[name].double()
        for path, w in zip(paths, (1.0, 0.5)):
            lora = open_lora(path)
            module = lora.modules.get(f"model.layers.{layer}.self_attn.q_proj")
            if module is not None:
                want = want + w * lora.delta(module, torch.float64)
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5)


def test_bad_combinations_are_refused(pair, tmp_path, llama_family):
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeStudioError, match="--method ties merges dense updates.*give --rank or --energy"):
        combine_loras(list(pair), out, method="ties")
    with pytest.raises(MergeStudioError, match="--density has no meaning for --method linear"):
        combine_loras(list(pair), out, density=0.5)
    with pytest.raises(MergeStudioError, match=r"--weights: give one value or one per LoRA \(2\), got 3"):
        combine_loras(list(pair), out, weights=[1, 2, 3])
    with pytest.raises(MergeStudioError, match=r"parameter 'density' = 0.0 is outside its range \(0, 1\]"):
        combine_loras(list(pair), out, method="dare_ties", density=0.0, rank=2)
    fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(MergeStudioError, match=rf"--rank 9 is larger than module '{fc1}' allows: its update is 16×8, "
                                               r"so at most rank 8"):
        combine_loras(list(pair), out, rank=9)
    other = kohya_lora(tmp_path / "c.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1": (2, 3 * H, (H,))})
    with pytest.raises(ModelError, match=rf"module '{fc1}' makes an update of shape \[24, 8\]"):
        combine_loras([pair[0], other], out)
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    save_file({"base_model.model.x.lora_A.weight": torch.ones(1, 4), "base_model.model.x.lora_B.weight": torch.ones(4, 1)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="is in peft format, .* in kohya; combine LoRAs of one format"):
        combine_loras([pair[0], folder], out)
    assert not out.exists()
