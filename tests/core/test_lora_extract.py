"""Extracting a LoRA from two models: Eckart–Young error, energy ranks, loadable by PEFT.

References: the singular values of each ΔW computed here in float64
(``torch.linalg.svdvals``), and the installed peft package loading the adapter
onto the base transformers model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import MergeStudioError, ModelError
from core.lora import extract_lora, merge_lora, open_lora
from core.lora.factor import factorize, factorize_product
from tests.fixtures.tiny_models import make_shape_mismatch, read_state_dict

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 200]])


def adapter_updates(folder: Path) -> dict[str, torch.Tensor]:
    """Weight name -> scale · B · A (transposed for embeddings / fan_in_fan_out), from the files alone."""
    import math
    import re

    config = json.loads((folder / "adapter_config.json").read_text())
    factors = load_file(folder / "adapter_model.safetensors")
    updates = {}
    for key, a in factors.items():
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A")):
            continue
        embedding = key.endswith("lora_embedding_A")
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        b = factors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        def pattern(table: dict, default):
            return next((v for p, v in table.items() if re.match(rf"(.*\.)?({p})$", module)), default)

        alpha = pattern(config["alpha_pattern"], config["lora_alpha"])
        rank = a.shape[0]
        assert rank == pattern(config["rank_pattern"], config["r"])
        update = (b.double() @ a.double()) * (alpha / rank)
        if embedding or config["fan_in_fan_out"]:
            update = update.T
        assert not math.isnan(float(update.sum()))
        updates[module + ".weight"] = update
    return updates


def test_reconstruction_error_is_the_eckart_young_tail(llama_family, tmp_path):
    out = tmp_path / "adapter"
    result = extract_lora(llama_family["base"], llama_family["a"], out, rank=5, device="cpu")
    base, tuned = read_state_dict(llama_family["base"]), read_state_dict(llama_family["a"])
    updates = adapter_updates(out)
    assert result.format == "peft" and len(updates) == len(result.modules) == 4 * 7 + 2  # + embed_tokens, lm_head
    reports = {r.tensor: r for r in result.modules}
    for name, update in updates.items():
        delta = tuned[name].double() - base[name].double()
        sigma = torch.linalg.svdvals(delta)
        tail = float((sigma[5:] ** 2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(delta - update))
        assert error == pytest.approx(tail, rel=1e-4, abs=1e-6), name
        assert reports[name].error == pytest.approx(tail, rel=1e-3) and reports[name].svd == "exact"
        assert reports[name].rank == 5
    norms = {n for n in base if n.endswith("norm.weight")}
    assert norms == set(result.skipped) and all("largest change" in result.skipped[n] for n in norms)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["lora_alpha"] == 5 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(llama_family["base"].absolute())


def test_energy_threshold_picks_the_smallest_rank_that_keeps_it(llama_family, tmp_path):
    out = tmp_path / "energy"
    result = extract_lora(llama_family["base"], llama_family["b"], out, energy=0.8, modules=r"layers\.[01]\.", device="cpu")
    base, tuned = read_state_dict(llama_family["base"]), read_state_dict(llama_family["b"])
    ranks = set()
    for report in result.modules:
        sigma = torch.linalg.svdvals(tuned[report.tensor].double() - base[report.tensor].double())
        share = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
        k = report.rank
        assert share[k - 1] >= 0.8 * (1 - 1e-6), report.module
        assert k == 1 or share[k - 2] < 0.8 * (1 + 1e-6), report.module
        ranks.add(k)
    assert len(ranks) > 1  # per-module ranks, written through rank_pattern
    assert all(".layers.0." in r.tensor or ".layers.1." in r.tensor for r in result.modules)
    updates = adapter_updates(out)  # checks rank_pattern against the factor shapes
    assert len(updates) == 2 * 7
    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_family["base"]), out)
    written = load_file(out / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(written) and all(torch.equal(loaded[k], written[k]) for k in written)


def _low_rank_tuned(base_path: Path, dest: Path, rank: int, seed: int = 7) -> Path:
    """base + an exact rank-``rank`` change on every 2-D weight (norms untouched)."""
    gen = torch.Generator().manual_seed(seed)
    state = read_state_dict(base_path)
    for name, w in state.items():
        if w.dim() == 2:
            change = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w.shape[1], generator=gen)
            state[name] = w + 0.02 * change
    dest.mkdir()
    shutil.copy2(base_path / "config.json", dest / "config.json")
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_peft_loads_the_adapter_and_matches_the_tuned_model(llama_family, tmp_path):
    import peft
    import transformers

    base_path = llama_family["base"]
    tuned_path = _low_rank_tuned(base_path, tmp_path / "tuned", rank=3)
    out = tmp_path / "adapter"
    extract_lora(base_path, tuned_path, out, rank=3, device="cpu")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    written = load_file(out / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(written)  # every factor in the file lands on a module, none is missing
    assert all(torch.equal(loaded[k], written[k]) for k in written)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tuned_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tuned(IDS).logits, rtol=1e-4, atol=1e-4)

    # Truncated below the change's rank: PEFT's output is the base plus the best rank-2 approximation.
    out2 = tmp_path / "adapter2"
    extract_lora(base_path, tuned_path, out2, rank=2, device="cpu")
    truncated = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_path), out2).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(base_path).eval()
    base_state, tuned_state = read_state_dict(base_path), read_state_dict(tuned_path)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.dim() == 2:
                u, s, vh = torch.linalg.svd((tuned_state[name] - base_state[name]).double(), full_matrices=False)
                param.copy_(base_state[name] + (u[:, :2] * s[:2]) @ vh[:2])
        torch.testing.assert_close(truncated(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(truncated(IDS).logits, tuned(IDS).logits, atol=1e-4)

    # Our own merge of the adapter gives the tuned weights back.
    merged = tmp_path / "merged"
    merge_lora(base_path, [out], merged)
    merged_state = read_state_dict(merged)
    for name, value in tuned_state.items():
        torch.testing.assert_close(merged_state[name], value, rtol=0, atol=1e-5)


def test_gpt2_conv1d_extraction_uses_fan_in_fan_out(gpt2_family, tmp_path):
    import peft
    import transformers

    base_path = gpt2_family["base"]
    out = tmp_path / "gpt2"
    extract_lora(base_path, gpt2_family["a"], out, rank=64, modules=r"\.h\.0\.(attn|mlp)\.", device="cpu")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path)
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    tuned = read_state_dict(gpt2_family["a"])
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"):
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-5)


def test_bad_requests_are_refused_before_anything_is_written(llama_family, single_file_ckpt, tmp_path):
    base, tuned = llama_family["base"], llama_family["a"]
    out = tmp_path / "out"
    k_proj = r"model\.layers\.0\.self_attn\.k_proj"
    with pytest.raises(MergeStudioError, match=rf"--rank 33 is larger than module '{k_proj}' allows: "
                                               rf"its weight '{k_proj}\.weight' is \[32, 64\], so at most rank 32"):
        extract_lora(base, tuned, out, rank=33, modules="k_proj")
    with pytest.raises(MergeStudioError, match="Give --rank R or --energy E"):
        extract_lora(base, tuned, out)
    with pytest.raises(MergeStudioError, match="not both"):
        extract_lora(base, tuned, out, rank=2, energy=0.5)
    with pytest.raises(MergeStudioError, match=r"--energy must lie in \(0, 1\]"):
        extract_lora(base, tuned, out, energy=1.5)
    with pytest.raises(MergeStudioError, match="--modules 'nothing_like_this' matches no tensor"):
        extract_lora(base, tuned, out, rank=2, modules="nothing_like_this")
    with pytest.raises(MergeStudioError, match="is not a regular expression"):
        extract_lora(base, tuned, out, rank=2, modules="([")
    with pytest.raises(MergeStudioError, match="--format peft needs a transformers model"):
        extract_lora(single_file_ckpt, single_file_ckpt, tmp_path / "p", rank=2, format="peft")
    with pytest.raises(MergeStudioError, match=r"none of the selected tensors is the weight of a layer a PEFT LoRA "
                                               r"can adapt in LlamaForCausalLM .*, e.g. 'model.norm.weight'"):
        extract_lora(base, tuned, out, rank=1, modules=r"^model\.norm\.")
    with pytest.raises(MergeStudioError, match="do not differ in any weight a LoRA can hold"):
        extract_lora(base, base, out, rank=2, device="cpu")
    mismatch = make_shape_mismatch(base, tmp_path / "mismatch")
    with pytest.raises(ModelError, match=f"Tensor '{mismatch.tensor}' has shape .* a LoRA cannot change a shape"):
        extract_lora(base, mismatch.path, out, rank=2)
    assert not out.exists()


def test_kohya_format_needs_a_stable_diffusion_model(llama_family, tmp_path):
    with pytest.raises(MergeStudioError, match="--format kohya is for Stable Diffusion models"):
        extract_lora(llama_family["base"], llama_family["a"], tmp_path / "x.safetensors", rank=2, format="kohya")


# ----------------------------------------------------------------------------- the factorization itself


def test_randomized_svd_is_near_optimal_and_reproducible():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(600, 5, generator=gen) @ torch.randn(5, 400, generator=gen)
    matrix = low + 1e-3 * torch.randn(600, 400, generator=gen)
    sigma = torch.linalg.svdvals(matrix.double())
    tail = float((sigma[5:] ** 2).sum().sqrt())
    first = factorize(matrix, rank=5, svd="randomized", generator=torch.Generator().manual_seed(1))
    again = factorize(matrix, rank=5, svd="randomized", generator=torch.Generator().manual_seed(1))
    assert first.method == "randomized" and torch.equal(first.a, again.a) and torch.equal(first.b, again.b)
    assert first.error == pytest.approx(float(torch.linalg.matrix_norm((matrix - first.b @ first.a).double())), rel=1e-6)
    assert tail <= first.error <= 1.01 * tail
    energy = factorize(matrix, energy=0.999, svd="randomized", generator=torch.Generator().manual_seed(2))
    assert energy.rank == 5 and 1 - (energy.error / energy.norm) ** 2 >= 0.999
    assert factorize(matrix, rank=5).method == "exact"  # auto: exact up to 1024 on the short side


def test_factorizing_a_product_equals_the_dense_svd():
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(50, 9, generator=gen, dtype=torch.float64), torch.randn(9, 70, generator=gen, dtype=torch.float64)
    dense = factorize(b @ a, rank=4)
    product = factorize_product(b, a, rank=4)
    torch.testing.assert_close(product.b @ product.a, dense.b @ dense.a)
    assert product.error == pytest.approx(dense.error, rel=1e-9)
    padded = factorize_product(b, a, rank=12)  # more than the product's rank 9: zero directions
    assert padded.rank == 12 and padded.error == pytest.approx(0, abs=1e-9)
    torch.testing.assert_close(padded.b @ padded.a, b @ a)


def test_extracted_lora_reads_back(llama_family, tmp_path):
    out = tmp_path / "x"
    extract_lora(llama_family["base"], llama_family["a"], out, rank=2, dtype="bfloat16", modules="q_proj", device="cpu")
    lora = open_lora(out)
    assert lora.format == "peft" and len(lora.modules) == 4
    assert {lora.tensors[m.up].dtype for m in lora.modules.values()} == {"BF16"}
    assert {lora.scale(m) for m in lora.modules.values()} == {1.0}


def test_kohya_names_of_a_clip_text_encoder_saved_without_text_model(tmp_path):
    """transformers 5 saves CLIPTextModel as 'encoder.layers.0...'; kohya names it 'text_model_encoder_layers_0_...'."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8)
    torch.manual_seed(0)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    CLIPTextModel(config).save_pretrained(base)
    shutil.copytree(base, tuned)
    state = load_file(tuned / "model.safetensors")
    q = "encoder.layers.1.self_attn.q_proj.weight"
    assert q in state  # the layout this test is about
    change = torch.randn(16, 1, generator=torch.Generator().manual_seed(1)) @ torch.randn(1, 16)
    state[q] = state[q] + 0.1 * change
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "te.safetensors"
    extract_lora(base, tuned, out, rank=1, format="kohya", device="cpu")
    lora = open_lora(out)
    assert set(lora.modules) == {"lora_te_text_model_encoder_layers_1_self_attn_q_proj"}  # sd-scripts' name
    lora.close()
    merged = tmp_path / "merged"
    merge_lora(base, [out], merged)  # and it resolves back onto the unprefixed tensor
    torch.testing.assert_close(load_file(merged / "model.safetensors")[q], state[q], rtol=0, atol=1e-5)
