"""Merging LoRAs into transformers models, and reading LoRA files.

References: the formula W + strength · (alpha / r) · B · A written out here
from the adapter's own tensors, and PEFT's ``merge_and_unload`` on the same
adapter (the installed peft package).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import CancelledError, MergeStudioError, ModelError
from core.jobs import CancelToken
from core.lora import LoraSpec, iter_merge_lora, merge_lora, open_lora, parse_spec
from tests.fixtures.tiny_models import make_sharded, read_state_dict

PREFIX = "base_model.model."


def make_adapter(base: Path, dest: Path, *, seed: int, targets: list[str], r: int = 4, alpha: float = 8, **extra) -> Path:
    """A trained-looking PEFT adapter (random B, so it changes the model) saved by peft itself."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def adapters(llama_family, gpt2_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "llama": make_adapter(llama_family["base"], root / "llama", seed=1,
                              targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                              alpha_pattern={"down_proj": 2.0}),
        "llama2": make_adapter(llama_family["base"], root / "llama2", seed=2, targets=["q_proj", "o_proj"], r=2,
                               alpha=2, use_rslora=True),
        "gpt2": make_adapter(gpt2_family["base"], root / "gpt2", seed=3, targets=["c_attn", "c_fc"], fan_in_fan_out=True),
    }


def formula(base: dict, adapter: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The expected merged tensors, from adapter_config.json and the factors, written out."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in factors.items():
        if ".lora_A." not in key and not key.endswith("lora_embedding_A"):
            continue
        embedding = key.endswith("lora_embedding_A")
        module = key[len(PREFIX):].rsplit(".lora_", 1)[0]
        b = factors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        r = a.shape[0]
        alpha = next((v for p, v in (config.get("alpha_pattern") or {}).items() if module.endswith(p)), config["lora_alpha"])
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        update = b.double() @ a.double()
        if embedding or config.get("fan_in_fan_out"):
            update = update.T
        name = module + ".weight"
        out[name] = (base[name].double() + strength * scale * update).to(base[name].dtype)
    return out


def test_peft_merge_equals_the_formula_and_peft_merge_and_unload(llama_family, adapters, tmp_path):
    import peft
    import transformers

    base_path, adapter = llama_family["base"], adapters["llama"]
    out = tmp_path / "merged"
    result = merge_lora(base_path, [adapter], out)
    base, merged = read_state_dict(base_path), read_state_dict(out)
    expected = formula(base, adapter)
    assert result.changed == len(expected) == 4 * 3 + 1 and result.tensors == len(base)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6)
        assert not torch.equal(merged[name], base[name])
    for name in set(base) - set(expected):
        assert merged[name].numpy().tobytes() == base[name].numpy().tobytes(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path)
    reference = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    for name in expected:
        torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=1e-6)
    for extra in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / extra).is_file()
    assert not (out / "README.md").exists()  # the input's model card does not describe the output
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_strengths_of_several_loras_add_up(llama_family, adapters, tmp_path):
    base_path = llama_family["base"]
    out = tmp_path / "two"
    merge_lora(base_path, [LoraSpec(adapters["llama"], 0.5), (adapters["llama2"], -1.5)], out)
    base, merged = read_state_dict(base_path), read_state_dict(out)
    first, second = formula(base, adapters["llama"], 0.5), formula(base, adapters["llama2"], -1.5)
    for name in set(first) | set(second):
        want = base[name].double()
        for part in (first, second):
            if name in part:
                want = want + (part[name].double() - base[name].double())
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5)


def test_gpt2_conv1d_lora_with_fan_in_fan_out_matches_peft(gpt2_family, adapters, tmp_path):
    import peft
    import transformers

    out = tmp_path / "gpt2"
    merge_lora(gpt2_family["base"], [adapters["gpt2"]], out)
    merged = read_state_dict(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_family["base"])
    reference = peft.PeftModel.from_pretrained(model, adapters["gpt2"]).merge_and_unload().state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    assert merged[name].shape == (64, 192)
    torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=1e-6)
    assert not torch.equal(merged[name], read_state_dict(gpt2_family["base"])[name])


def test_bf16_and_sharded_models_keep_their_dtype_and_layout(llama_family, llama_family_bf16, adapters, tmp_path):
    out = tmp_path / "bf16"
    merge_lora(llama_family_bf16["base"], [adapters["llama"]], out)
    base, merged = read_state_dict(llama_family_bf16["base"]), read_state_dict(out)
    for name, value in formula(base, adapters["llama"]).items():
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-2)
    sharded = make_sharded(llama_family["base"], tmp_path / "sharded-in", "100KB")
    out2 = tmp_path / "sharded-out"
    result = merge_lora(sharded, [adapters["llama"]], out2, shard_size=100_000)
    assert (out2 / "model.safetensors.index.json").is_file() and len(result.files) > 1
    plain = tmp_path / "plain"
    merge_lora(llama_family["base"], [adapters["llama"]], plain)
    one, many = read_state_dict(plain), read_state_dict(out2)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_lora_for_another_model_is_refused_before_any_weight_is_read(llama_family, adapters, tmp_path, monkeypatch):
    import core.io.tensors as tensors

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the checks passed")

    monkeypatch.setattr(tensors.SafetensorsReader, "get", no_reads)
    out = tmp_path / "out"
    key = r"base_model\.model\.transformer\.h\.\d\.(attn\.c_attn|mlp\.c_fc)\.lora_A\.weight"
    with pytest.raises(ModelError, match=rf"key '{key}' matches no module of .*tiny-llama-base "
                                         r"\(8 of its 8 modules match nothing\)"):
        merge_lora(llama_family["base"], [adapters["gpt2"]], out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_lora_of_the_wrong_shape_is_refused_naming_module_and_shapes(llama_family, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    key = f"{PREFIX}model.layers.1.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 32), f"{key}.lora_B.weight": torch.ones(64, 2)},
              str(folder / "adapter_model.safetensors"))
    q_proj = r"model\.layers\.1\.self_attn\.q_proj"
    with pytest.raises(ModelError, match=rf"module '{q_proj}' makes an update of shape \[64, 32\] "
                                         rf"but tensor '{q_proj}\.weight' .* has shape \[64, 64\]"):
        merge_lora(llama_family["base"], [folder], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_rules(llama_family, single_file_ckpt, adapters, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(MergeStudioError, match="exists and is not empty; pass --overwrite"):
        merge_lora(llama_family["base"], [adapters["llama"]], taken)
    assert (taken / "keep.txt").read_text() == "mine"
    merge_lora(llama_family["base"], [adapters["llama"]], taken, overwrite=True)
    assert not (taken / "keep.txt").exists() and (taken / "model.safetensors").is_file()
    with pytest.raises(MergeStudioError, match="a single-file output must end in .safetensors"):
        merge_lora(single_file_ckpt, [adapters["llama"]], tmp_path / "folder-out")
    with pytest.raises(MergeStudioError, match="is a folder, so the output is a folder too"):
        merge_lora(llama_family["base"], [adapters["llama"]], tmp_path / "x.safetensors")
    single = tmp_path / "single.safetensors"
    merge_lora(single_file_ckpt, [adapters["llama"]], single)
    assert single.is_file()
    with pytest.raises(MergeStudioError, match="exists; pass --overwrite"):
        merge_lora(single_file_ckpt, [adapters["llama"]], single)


def test_cancel_leaves_nothing_behind(llama_family, adapters, tmp_path):
    token = CancelToken()
    seen = []

    def on_progress(p):
        seen.append(p)
        if p.done == 3:
            token.cancel()

    with pytest.raises(CancelledError):
        merge_lora(llama_family["base"], [adapters["llama"]], tmp_path / "out", on_progress=on_progress, cancel=token)
    assert len(seen) == 3 and not list(tmp_path.iterdir())
    work = iter_merge_lora(llama_family["base"], [adapters["llama"]], tmp_path / "gen")
    first = next(work)
    assert first.done == 1 and first.total == len(read_state_dict(llama_family["base"]))
    assert any(tmp_path.iterdir())  # the hidden partial folder exists while it runs
    work.close()
    assert not list(tmp_path.iterdir())


def test_a_lora_with_nan_is_refused(llama_family, tmp_path):
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    key = f"{PREFIX}model.layers.0.mlp.up_proj"
    save_file({f"{key}.lora_A.weight": torch.full((1, 64), float("nan")), f"{key}.lora_B.weight": torch.ones(128, 1)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="module 'model.layers.0.mlp.up_proj' holds NaN or Inf"):
        merge_lora(llama_family["base"], [folder], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


# ----------------------------------------------------------------------------- reading LoRA files


def test_scales_follow_peft_and_kohya_rules(adapters, tmp_path):
    llama = open_lora(adapters["llama"])
    assert llama.format == "peft"
    assert llama.scale(llama.modules["model.layers.0.self_attn.q_proj"]) == 8 / 4
    assert llama.scale(llama.modules["model.layers.0.mlp.down_proj"]) == 2.0 / 4  # alpha_pattern
    assert llama.modules["model.embed_tokens"].embedding and llama.modules["model.embed_tokens"].delta_shape == (256, 64)
    assert "model.embed_tokens" in llama.base_copies  # PEFT saved the embedding layer too
    rs = open_lora(adapters["llama2"])
    assert rs.scale(next(iter(rs.modules.values()))) == pytest.approx(2 / math.sqrt(2))
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.lora_down.weight": torch.ones(4, 8), f"{stem}.lora_up.weight": torch.ones(8, 4)},
              str(tmp_path / "no_alpha.safetensors"))
    kohya = open_lora(tmp_path / "no_alpha.safetensors")
    assert kohya.format == "kohya" and kohya.scale(kohya.modules[stem]) == 1.0
    save_file({f"{stem}.lora_down.weight": torch.ones(4, 8), f"{stem}.lora_up.weight": torch.ones(8, 4),
               f"{stem}.alpha": torch.tensor(2.0)}, str(tmp_path / "alpha.safetensors"))
    with open_lora(tmp_path / "alpha.safetensors") as lora:
        assert lora.scale(lora.modules[stem]) == 0.5
        assert torch.equal(lora.delta(lora.modules[stem]), torch.full((8, 8), 2.0))


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"lora_unet_x.hada_w1_a": (2, 4), "lora_unet_x.hada_w1_b": (2, 4)}, "is a LyCORIS LoHa factor"),
        ({"lora_unet_x.lora_down.weight": (2, 4), "lora_unet_x.lora_up.weight": (4, 2), "lora_unet_x.dora_scale": (1, 4)},
         "is a DoRA magnitude vector"),
        ({"lora_unet_x.lora_down.weight": (2, 4), "lora_unet_x.lora_up.weight": (4, 3)},
         r"module 'lora_unet_x' has factors of shapes \[2, 4\] \(down\) and \[4, 3\] \(up\), which do not form a LoRA"),
        ({"lora_unet_x.lora_down.weight": (2, 4)}, "module 'lora_unet_x' has no up"),
        ({"lora_unet_x.lora_down.weight": (2, 4), "lora_unet_x.lora_up.weight": (4, 2), "lora_unet_x.alpha": (2,)},
         "should be one number"),
        ({"model.layers.0.weight": (4, 4)}, "not a LoRA"),
    ],
)
def test_files_that_are_not_plain_loras_are_refused_naming_the_key(tmp_path, tensors, message):
    path = tmp_path / "lora.safetensors"
    save_file({k: torch.ones(s) for k, s in tensors.items()}, str(path))
    with pytest.raises(ModelError, match=message):
        open_lora(path)


def test_peft_files_need_their_config_and_plain_lora(tmp_path):
    key = f"{PREFIX}model.layers.0.self_attn.q_proj"
    path = tmp_path / "adapter_model.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 4), f"{key}.lora_B.weight": torch.ones(4, 2)}, str(path))
    with pytest.raises(ModelError, match="no adapter_config.json is beside it, so its lora_alpha"):
        open_lora(path)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="use_dora is true"):
        open_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    assert open_lora(path).scale(open_lora(tmp_path).modules["model.layers.0.self_attn.q_proj"]) == 2.0
    save_file({f"{key}.lora_A.weight": torch.ones(2, 4), f"{key}.lora_B.weight": torch.ones(4, 2),
               f"{PREFIX}lm_head.weight": torch.ones(4, 4)}, str(path))
    with pytest.raises(ModelError, match=r"key 'base_model.model.lm_head.weight' is a full weight \(modules_to_save\?\)"):
        open_lora(tmp_path)
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        open_lora(tmp_path.parent)


def test_parse_spec():
    assert parse_spec("a/style.safetensors:0.7") == LoraSpec(Path("a/style.safetensors"), 0.7)
    assert parse_spec("adapter") == LoraSpec(Path("adapter"), 1.0)
    assert parse_spec("C:/x/y.safetensors") == LoraSpec(Path("C:/x/y.safetensors"), 1.0)
    assert parse_spec("x.safetensors:-1.5").strength == -1.5
    with pytest.raises(MergeStudioError, match="finite number"):
        merge_lora("nowhere", [("x", float("inf"))], "out")


def test_peft_copy_of_an_embedding_that_differs_from_the_model_is_refused(llama_family, adapters, tmp_path):
    # PEFT saved the base's embedding beside the factors; variant "a" has another embedding.
    copy = r"base_model\.model\.model\.embed_tokens\.base_layer\.weight"
    with pytest.raises(ModelError, match=rf"'{copy}' \(PEFT's copy of the base layer, .*\) differs from "
                                         r"'model\.embed_tokens\.weight' of the model"):
        merge_lora(llama_family["a"], [adapters["llama"]], tmp_path / "out")
    assert not list(tmp_path.iterdir())
