"""The tiny-model fixtures are what every merge test stands on: check they are what they say."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fixtures.tiny_models import (
    VOCAB_SIZE,
    make_family,
    read_state_dict,
    weight_files,
)


def _logits(path, ids=(1, 5, 17, 42, 99)):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_environment_is_hermetic(mergestudio_home):
    assert os.environ["MERGESTUDIO_HOME"] == str(mergestudio_home)
    assert mergestudio_home.is_dir()
    assert os.environ["QT_QPA_PLATFORM"] == "offscreen"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.parametrize("family", ["llama_family", "gpt2_family"])
def test_causal_families_load_with_finite_logits(family, request):
    paths = request.getfixturevalue(family)
    assert set(paths) == {"base", "a", "b", "c"}
    for name in ("base", "a"):
        logits = _logits(paths[name])
        assert logits.shape == (1, 5, VOCAB_SIZE)
        assert torch.isfinite(logits).all()
    # a variant is a small perturbation: its logits are close to, but not equal to, the base's
    base, a = _logits(paths["base"]), _logits(paths["a"])
    assert not torch.equal(base, a)
    assert (a - base).abs().max() < 0.5 * base.abs().max()


def test_bert_family_loads(bert_family):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(bert_family["base"]).eval()
    assert type(model).__name__ == "BertModel"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6, 2]])).last_hidden_state
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["llama_family", "gpt2_family", "bert_family", "llama_family_bf16"])
def test_every_folder_is_complete_and_tokenizer_loads_offline(family, request):
    from transformers import AutoTokenizer

    paths = request.getfixturevalue(family)
    causal = family != "bert_family"
    configs = {(p / "config.json").read_bytes() for p in paths.values()}
    assert len(configs) == 1, "variants must share the base's config.json"
    for p in paths.values():
        names = {f.name for f in p.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        assert ("generation_config.json" in names) == causal
    tok = AutoTokenizer.from_pretrained(paths["a"])
    assert len(tok) == VOCAB_SIZE
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok("Hello world, merge the model!")["input_ids"]
    assert ids and tok.unk_token_id not in ids and max(ids) < VOCAB_SIZE
    assert tok.decode(ids).replace(" ", "") == "helloworld,mergethemodel!"
    unk = tok("zyzzyva")["input_ids"]
    assert unk == [tok.unk_token_id]


@pytest.mark.parametrize("family", ["llama_family", "gpt2_family", "bert_family", "llama_family_bf16"])
def test_variants_are_small_distinct_finetunes(family, request):
    paths = request.getfixturevalue(family)
    base = read_state_dict(paths["base"])
    variants = {k: read_state_dict(p) for k, p in paths.items() if k != "base"}
    for name, sd in variants.items():
        assert sd.keys() == base.keys()
        for key, w in base.items():
            v = sd[key]
            assert v.shape == w.shape and v.dtype == w.dtype
            d = (v.float() - w.float())
            assert torch.isfinite(d).all()
            if w.dim() == 2:
                # rank-2 part + noise: about 2 % of the weight's std, per element
                rel = float(d.std() / w.float().std())
                assert 0.005 < rel < 0.06, (name, key, rel)
                # a few large outliers, ~10x the typical delta
                assert float(d.abs().max()) > 5 * float(d.std()), (name, key)
            else:
                assert 0 < float(d.abs().max()) < 0.2 * float(w.float().abs().max() + 0.02), (name, key)
    a, b = variants["a"], variants["b"]
    key = next(k for k, w in base.items() if w.dim() == 2)
    da, db = a[key].float() - base[key].float(), b[key].float() - base[key].float()
    cos = float(torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0))
    assert abs(cos) < 0.5, "variants should have (mostly) independent deltas"


def test_bf16_family_is_bf16(llama_family_bf16):
    for p in llama_family_bf16.values():
        assert json.loads((p / "config.json").read_text())["dtype"] == "bfloat16"
        assert {t.dtype for t in load_file(p / "model.safetensors").values()} == {torch.bfloat16}


def test_families_are_deterministic_from_the_seed(llama_family, tmp_path):
    again = make_family(tmp_path / "again", arch="llama", n_variants=1, seed=0)
    for k in ("base", "a"):
        assert (again[k] / "model.safetensors").read_bytes() == (llama_family[k] / "model.safetensors").read_bytes()
        assert (again[k] / "tokenizer.json").read_bytes() == (llama_family[k] / "tokenizer.json").read_bytes()
    other = make_family(tmp_path / "other", arch="llama", n_variants=0, seed=1)
    assert (other["base"] / "model.safetensors").read_bytes() != (llama_family["base"] / "model.safetensors").read_bytes()


def test_safetensors_metadata_is_pt(llama_family, llama_sharded, single_file_ckpt, diffusers_pipelines):
    files = [llama_family["a"] / "model.safetensors", single_file_ckpt, *weight_files(llama_sharded)]
    files.append(diffusers_pipelines["a"] / "unet" / "diffusion_pytorch_model.safetensors")
    for f in files:
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}, f


def test_sharded_copy(llama_family, llama_sharded):
    index = json.loads((llama_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(f.name for f in llama_sharded.glob("*.safetensors")) == shards
    assert not (llama_sharded / "model.safetensors").exists()
    base = read_state_dict(llama_family["base"])
    sharded = read_state_dict(llama_sharded)
    assert sharded.keys() == base.keys() == index["weight_map"].keys()
    assert all(torch.equal(sharded[k], base[k]) for k in base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    assert torch.equal(_logits(llama_sharded), _logits(llama_family["base"]))


def test_single_file_checkpoint(llama_family, single_file_ckpt):
    assert single_file_ckpt.is_file() and single_file_ckpt.suffix == ".safetensors"
    assert not (single_file_ckpt.parent / "config.json").exists()
    base = read_state_dict(llama_family["base"])
    single = load_file(single_file_ckpt)
    assert single.keys() == base.keys()
    assert all(torch.equal(single[k], base[k]) for k in base)


def test_diffusers_pipelines_are_mergeable(diffusers_pipelines):
    a, b = diffusers_pipelines["a"], diffusers_pipelines["b"]
    index = json.loads((a / "model_index.json").read_text())
    comps = {k for k, v in index.items() if not k.startswith("_")}
    assert comps == {"unet", "text_encoder", "vae"}
    for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.safetensors"),
                        ("text_encoder", "model.safetensors")):
        assert (a / comp / "config.json").exists()
        sa, sb = load_file(a / comp / fname), load_file(b / comp / fname)
        assert len(sa) >= 10
        assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
        assert all(torch.isfinite(t).all() for t in sa.values())
        assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    unet = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    assert "conv_in.weight" in unet
    assert "down_blocks.0.attentions.0.proj_in.weight" in unet
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet


def test_diffusers_text_encoder_loads_with_transformers(diffusers_pipelines):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(diffusers_pipelines["a"] / "text_encoder").eval()
    with torch.no_grad():
        out = te(input_ids=torch.tensor([[1, 10, 20, 2]])).last_hidden_state
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------ bad inputs


def test_bad_models_has_everything(bad_models):
    assert set(bad_models) == {
        "pickle_only", "corrupt_header", "corrupt_header_length", "truncated", "shape_mismatch",
        "missing_tensor", "different_layers", "nan", "not_a_model",
    }
    for name, bad in bad_models.items():
        assert bad.path.exists(), name
        assert os.fspath(bad) == str(bad.path)
        assert bad_models[name] is getattr(bad_models, name)


@pytest.mark.parametrize("name", ["corrupt_header", "corrupt_header_length", "truncated"])
def test_safetensors_refuses_broken_files(bad_models, name):
    bad = bad_models[name]
    assert bad.file.name == "model.safetensors"
    with pytest.raises(Exception):
        with safe_open(bad.file, "pt") as sf:
            for k in sf.keys():
                sf.get_tensor(k)


def test_truncated_names_the_cut_tensor(bad_models, llama_family):
    bad = bad_models.truncated
    assert bad.tensor in read_state_dict(llama_family["base"])
    assert bad.file.stat().st_size < (llama_family["base"] / "model.safetensors").stat().st_size


def test_shape_mismatch(bad_models, llama_family):
    bad = bad_models.shape_mismatch
    base = read_state_dict(llama_family["base"])
    changed = load_file(bad.file)
    assert bad.tensor == "model.layers.1.mlp.up_proj.weight"
    assert changed[bad.tensor].shape != base[bad.tensor].shape
    assert changed.keys() == base.keys()
    assert all(changed[k].shape == base[k].shape for k in base if k != bad.tensor)
    assert (bad.path / "config.json").read_bytes() == (llama_family["base"] / "config.json").read_bytes()


def test_missing_tensor(bad_models, llama_family):
    bad = bad_models.missing_tensor
    base = read_state_dict(llama_family["base"])
    assert bad.tensor == "model.layers.2.self_attn.k_proj.weight"
    assert set(base) - set(load_file(bad.file)) == {bad.tensor}


def test_nan_and_inf(bad_models, llama_family):
    bad = bad_models.nan
    sd = load_file(bad.file)
    assert bad.tensor == "model.layers.0.self_attn.q_proj.weight"
    t = sd[bad.tensor]
    assert torch.isnan(t).sum() == 1 and torch.isinf(t).sum() == 1
    assert all(torch.isfinite(v).all() for k, v in sd.items() if k != bad.tensor)


def test_pickle_only(bad_models, llama_family):
    bad = bad_models.pickle_only
    assert not list(bad.path.glob("*.safetensors"))
    assert bad.file.name == "pytorch_model.bin"
    sd = torch.load(bad.file, weights_only=True)
    base = read_state_dict(llama_family["base"])
    assert sd.keys() == base.keys() and all(torch.equal(sd[k], base[k]) for k in base)


def test_different_layers(bad_models, llama_family):
    bad = bad_models.different_layers
    cfg = json.loads((bad.path / "config.json").read_text())
    base_cfg = json.loads((llama_family["base"] / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and base_cfg["num_hidden_layers"] == 4
    assert cfg["model_type"] == base_cfg["model_type"] and cfg["hidden_size"] == base_cfg["hidden_size"]
    assert "model.layers.5.mlp.up_proj.weight" in read_state_dict(bad.path)


def test_not_a_model(bad_models):
    bad = bad_models.not_a_model
    assert [p.name for p in bad.path.iterdir()] == ["README.md"]
