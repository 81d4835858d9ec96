"""A1111's modes on SD checkpoints: formulas per tensor, block weights, inpainting, convert, output, metadata."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import core.merge as merge
from core.errors import CancelledError, MergeStudioError, ModelError, RecipeError
from core.merge.recipe import recipe_from_dict
from tests.fixtures import sd_checkpoints as F


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return F.make_sd_set(tmp_path_factory.getbasetemp() / "sd-set")  # one set per session


def _recipe(method: str, refs, **extra):
    return recipe_from_dict({"merge_method": method, "models": [{"model": str(r)} for r in refs], **extra})


def _merge(tmp_path: Path, method: str, refs, name: str = "out.safetensors", **extra) -> Path:
    out = tmp_path / name
    merge.run(_recipe(method, refs, **extra), out, device="cpu")
    return out


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _block(name: str) -> str:
    """The test's own block rule for original-layout SD 1.x names."""
    m = re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.", name)
    if m:
        return ("IN" if m.group(1) == "input" else "OUT") + m.group(2).zfill(2)
    if name.startswith("model.diffusion_model.middle_block."):
        return "M00"
    if name.startswith("model.diffusion_model.time_embed."):  # before the input blocks (merge-block-weighted)
        return "IN00"
    if name.startswith("model.diffusion_model.out."):  # the final norm and conv: after the output blocks
        return "OUT11"
    return "VAE" if name.startswith("first_stage_model.") else "BASE"


def _is_weight(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and name not in F._SCHEDULE


def _check_formula(out: Path, states: list[dict], formula, ratio_of) -> None:
    """Every tensor of ``out`` equals ``formula(inputs, ratio)`` (computed here in float32); buffers are A's."""
    merged = load_file(out)
    assert set(merged) == set(states[0])
    for name, a in states[0].items():
        got = merged[name]
        assert got.dtype == a.dtype and got.shape == a.shape, name
        if not _is_weight(name, a):
            assert torch.equal(got, a), name
            continue
        want = formula([s[name].float() for s in states], ratio_of(name)).to(a.dtype)
        torch.testing.assert_close(got, want, msg=name)


def _ws(x, alpha):
    return x[0] * (1 - alpha) + x[1] * alpha


def _ad(x, m):
    return x[0] + m * (x[1] - x[2])


def test_weighted_sum_is_its_formula(ckpts, tmp_path):
    a, b = ckpts["sd1_a"], ckpts["sd1_b"]
    out = _merge(tmp_path, "weighted_sum", [a, b], parameters={"alpha": 0.3})
    _check_formula(out, [load_file(a), load_file(b)], _ws, lambda name: 0.3)
    assert list(tmp_path.iterdir()) == [out]  # one file, no leftovers


def test_weighted_sum_with_block_weights_tensor_by_tensor(ckpts, tmp_path):
    a, b = ckpts["sd1_a"], ckpts["sd1_b"]
    table = {"BASE": 0.2, "IN00": 1.0, "IN05": 0.0, "M00": 0.75, "OUT11": 0.9, "VAE": 0.0}
    out = _merge(tmp_path, "weighted_sum", [a, b], parameters={"alpha": {"blocks": table, "default": 0.4}})
    sa, sb = load_file(a), load_file(b)
    _check_formula(out, [sa, sb], _ws, lambda name: table.get(_block(name), 0.4))
    merged = load_file(out)
    for conv in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight"):
        assert torch.equal(merged[conv], sb[conv])  # IN00, alpha 1: B exactly
    final = "model.diffusion_model.out.2.weight"  # OUT11: 0.9, not BASE's 0.2
    torch.testing.assert_close(merged[final], (sa[final].float() * 0.1 + sb[final].float() * 0.9).half())
    for name in sa:  # alpha 0: A exactly (IN05, and the VAE kept as A's)
        if name.startswith(("model.diffusion_model.input_blocks.5.", "first_stage_model.")):
            assert torch.equal(merged[name], sa[name]), name
    applied = json.loads(_metadata(out)["mergestudio_block_weights"])
    alpha = applied["parameters"]["alpha"]
    assert applied["architecture"] == "sd1" and alpha["IN05"] == 0.0 and alpha["IN01"] == 0.4 and alpha["VAE"] == 0.0
    assert list(alpha) == applied["blocks"] and len(alpha) == 27


def test_add_difference_with_a_supermerger_string(ckpts, tmp_path):
    refs = [ckpts["sd1_a"], ckpts["sd1_b"], ckpts["sd1_c"]]
    values = [round(0.04 * i, 2) for i in range(26)]  # BASE, IN00..IN11, M00, OUT00..OUT11
    order = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
    per_block = dict(zip(order, values))
    out = _merge(tmp_path, "add_difference", refs, parameters={"multiplier": {"blocks": ",".join(map(str, values))}})
    states = [load_file(r) for r in refs]
    _check_formula(out, states, _ad, lambda name: per_block.get(_block(name), per_block["BASE"]))
    fields = json.loads(_metadata(out)["sd_merge_recipe"])
    assert fields["interp_method"] == "Add difference" and fields["multiplier"] is None  # no single value
    assert fields["block_weights"]["parameters"]["multiplier"]["OUT11"] == 1.0


def test_per_model_parameters_take_block_weights(ckpts, tmp_path):
    a, b = ckpts["sd1_a"], ckpts["sd1_b"]
    recipe = recipe_from_dict({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [
        {"model": str(a)}, {"model": str(b), "parameters": {"weight": {"blocks": {"IN00": 3.0, "M00": 0.0}}}}]})
    out = tmp_path / "lin.safetensors"
    merge.run(recipe, out, device="cpu")
    weights = {"IN00": 3.0, "M00": 0.0}  # unnamed blocks fall back to the recipe's weight: 1.0
    _check_formula(out, [load_file(a), load_file(b)],
                   lambda x, w: (x[0] + w * x[1]) / (1 + w), lambda name: weights.get(_block(name), 1.0))
    applied = json.loads(_metadata(out)["mergestudio_block_weights"])
    assert applied["models"][str(b)]["weight"]["IN00"] == 3.0 and applied["models"][str(a)]["weight"]["IN00"] == 1.0


@pytest.mark.parametrize("method", ["add_difference", "weighted_sum"])
def test_inpainting_model_as_a_keeps_its_extra_channels(ckpts, tmp_path, method):
    refs = [ckpts["sd1_inpaint"], ckpts["sd1_b"]] + ([ckpts["sd1_c"]] if method == "add_difference" else [])
    params = {"multiplier": 1.0} if method == "add_difference" else {"alpha": 0.25}
    out = _merge(tmp_path, method, refs, parameters=params)
    states = [load_file(r) for r in refs]
    merged = load_file(out)
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    assert merged[conv].shape == (8, 9, 3, 3)
    assert torch.equal(merged[conv][:, 4:], states[0][conv][:, 4:])  # mask and masked-image channels: A's
    x = [states[0][conv][:, :4].float()] + [s[conv].float() for s in states[1:]]
    want = _ad(x, 1.0) if method == "add_difference" else _ws(x, 0.25)
    torch.testing.assert_close(merged[conv][:, :4], want.to(torch.float16))
    other = "model.diffusion_model.output_blocks.3.1.proj_in.weight"
    y = [s[other].float() for s in states]
    torch.testing.assert_close(merged[other], (_ad(y, 1.0) if method == "add_difference" else _ws(y, 0.25)).half())
    fields = json.loads(_metadata(out)["sd_merge_recipe"])
    assert fields["is_inpainting"] is True and fields["is_instruct_pix2pix"] is False


# ----------------------------------------------------------------------------- convert


def test_convert_to_bfloat16(ckpts, tmp_path):
    out = _merge(tmp_path, "convert", [ckpts["sd1_a"]], out_dtype="bfloat16")
    merged, source = load_file(out), load_file(ckpts["sd1_a"])
    for name, t in source.items():
        assert torch.equal(merged[name], t.to(torch.bfloat16) if t.is_floating_point() else t), name
    fields = json.loads(_metadata(out)["sd_merge_recipe"])
    assert fields["interp_method"] == "No interpolation" and fields["save_as_half"] is False


def test_convert_bakes_in_a_vae(ckpts, tmp_path):
    out = _merge(tmp_path, "convert", [ckpts["sd1_a"]], vae=str(ckpts["vae"]), out_dtype="float16")
    merged, source, vae = load_file(out), load_file(ckpts["sd1_a"]), load_file(ckpts["vae"])
    assert set(merged) == set(source)
    for name, t in source.items():
        if name.startswith("first_stage_model."):
            assert torch.equal(merged[name], vae[name.removeprefix("first_stage_model.")].half()), name
        else:  # out_dtype applies to every float tensor, the float32 noise schedule too (as A1111's save-as-half)
            assert torch.equal(merged[name], t.half() if t.is_floating_point() else t), name
    assert json.loads(_metadata(out)["sd_merge_recipe"])["bake_in_vae"] == "vae.safetensors"
    plan = merge.check(_recipe("convert", [ckpts["sd1_novae"]], vae=str(ckpts["vae"])))
    try:  # a model without a VAE gets one, and the plan says so
        assert any("has no VAE" in n for n in plan.notes)
        assert sum(op.out_name.startswith("first_stage_model.") for op in plan.ops) == len(vae)
    finally:
        plan.close()


@pytest.mark.parametrize(
    "options, words",
    [
        ({"drop": ("decoder.conv_out.bias",)}, ["has no tensor 'decoder.conv_out.bias'", "does not fit"]),
        ({"extra": {"decoder.extra.weight": (3,)}}, ["'decoder.extra.weight' has no counterpart", "does not fit"]),
        ({"extra": {"quant_conv.bias": (3,)}}, ["'quant_conv.bias' has shape [3]", "has [8]", "does not fit"]),
    ],
)
def test_a_vae_that_does_not_fit_is_refused_naming_the_key(ckpts, tmp_path, options, words):
    vae = F.make_vae(tmp_path / "bad_vae.safetensors", **options)
    with pytest.raises(ModelError) as info:
        merge.check(_recipe("weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]], vae=str(vae)))
    assert str(vae) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_diffusers_vae_does_not_fit_an_original_checkpoint(ckpts, tmp_path):
    from safetensors.torch import save_file

    vae = tmp_path / "diffusers_vae.safetensors"  # diffusers' names for the same VAE
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, str(vae))
    with pytest.raises(ModelError, match=r"uses diffusers' VAE names .* needs the original \(ldm\) VAE names"):
        merge.check(_recipe("convert", [ckpts["sd1_a"]], vae=str(vae)))


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory) -> Path:
    """A VAE folder as diffusers saves it (config.json + diffusers-named weights)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dvae") / "my-vae"
    AutoencoderKL(**F.vae_config()).save_pretrained(root)
    return root


def _pipeline_without_vae(root: Path) -> Path:
    pipe = F.make_pipeline(root, "sd1", seed=1)
    shutil.rmtree(pipe / "vae")
    index = json.loads((pipe / "model_index.json").read_text())
    index.pop("vae")
    (pipe / "model_index.json").write_text(json.dumps(index))
    return pipe


def _refused_naming(vae: Path, recipe, out: Path, words: list[str]) -> None:
    with pytest.raises(ModelError) as info:
        merge.run(recipe, out, device="cpu")
    text = str(info.value)
    assert text.startswith(f"{vae}: ") and text.count(". ") == 0 and text.endswith("first."), text  # one sentence
    for word in words:
        assert word in text, text
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_diffusers_vae_is_not_baked_into_a_single_file_without_a_vae(ckpts, diffusers_vae, tmp_path):
    """first_stage_model.encoder.down_blocks.* would be a checkpoint A1111 cannot load."""
    out = tmp_path / "out.safetensors"
    recipe = _recipe("convert", [ckpts["sd1_novae"]], vae=str(diffusers_vae))
    _refused_naming(diffusers_vae, recipe, out, [
        "diffusers' VAE names (encoder.down_blocks.0.resnets.0...)", f"model '{ckpts['sd1_novae']}'",
        "a single-file (original layout) checkpoint", "the original (ldm) VAE names (encoder.down.0.block.0...)",
        "convert the VAE"])
    single = tmp_path / "diffusers-named.safetensors"  # the same weights as one file, no config
    shutil.copy(diffusers_vae / "diffusion_pytorch_model.safetensors", single)
    _refused_naming(single, _recipe("convert", [ckpts["sd1_novae"]], vae=str(single)), out, ["diffusers' VAE names"])


def test_an_original_vae_is_not_baked_into_a_pipeline_without_a_vae(ckpts, diffusers_vae, tmp_path):
    pipe = _pipeline_without_vae(tmp_path / "pipe")
    out = tmp_path / "out"
    for vae in (ckpts["vae"], ckpts["sd1_a"]):  # a VAE file, and the VAE of a whole checkpoint
        _refused_naming(vae, _recipe("convert", [pipe], vae=str(vae)), out, [
            "the original (ldm) VAE names (encoder.down.0.block.0...)", "a diffusers pipeline",
            "needs diffusers' VAE names"])
    # the matching layout is baked in, name for name
    merge.run(_recipe("convert", [pipe], vae=str(diffusers_vae)), out, device="cpu")
    got = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    want = load_file(diffusers_vae / "diffusion_pytorch_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    # ...and the pipeline lists it, with its config, so it loads whole.
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(out / "vae")
    # A diffusers-named VAE without its config.json cannot be added to a pipeline.
    single = tmp_path / "no-config.safetensors"
    shutil.copy(diffusers_vae / "diffusion_pytorch_model.safetensors", single)
    with pytest.raises(ModelError, match="has no config.json"):
        merge.run(_recipe("convert", [pipe], vae=str(single)), tmp_path / "out2", device="cpu")
    assert not (tmp_path / "out2").exists()


def test_vae_layouts_are_told_from_their_names(diffusers_vae):
    from core.merge.sd_plan import vae_layout

    ldm = [k for k in F.vae_shapes(prefix="")]
    assert vae_layout(ldm) == "ldm"
    with safe_open(str(diffusers_vae / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert vae_layout(list(f.keys())) == "diffusers"
    assert vae_layout(["encoder.conv_in.weight", "decoder.conv_out.weight"]) is None  # the names both share
    assert vae_layout(["encoder.down.0.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"]) == "mixed"


def test_drop_patterns_are_regular_expressions_searched_in_names(ckpts, tmp_path):
    out = _merge(tmp_path, "convert", [ckpts["sd1_a"]], drop=["^cond_stage_model\\.", "position_ids$"])
    merged, source = load_file(out), load_file(ckpts["sd1_a"])
    assert set(merged) == {n for n in source if not n.startswith("cond_stage_model.")}
    assert json.loads(_metadata(out)["sd_merge_recipe"])["discard_weights"] == "^cond_stage_model\\.|position_ids$"
    with pytest.raises(RecipeError, match="drop: pattern 'first_stage_modle' matches no tensor"):
        merge.check(_recipe("convert", [ckpts["sd1_a"]], drop=["first_stage_modle"]))


def test_ema_keep_drop_use(ckpts, tmp_path):
    a, b = ckpts["sd1_ema_a"], ckpts["sd1_ema_b"]
    out = _merge(tmp_path, "weighted_sum", [a, b], "keep.safetensors", parameters={"alpha": {"blocks": {"IN04": 1.0}}})
    merged, sa, sb = load_file(out), load_file(a), load_file(b)
    ema = "model_ema.diffusion_modelinput_blocks41proj_inweight"  # the copy of input_blocks.4.1.proj_in.weight
    assert torch.equal(merged[ema], sb[ema])  # IN04's alpha 1 reaches its EMA copy
    out = _merge(tmp_path, "weighted_sum", [a, ckpts["sd1_b"]], "drop.safetensors", ema="drop")
    assert not any(n.startswith("model_ema.") for n in load_file(out))
    out = _merge(tmp_path, "convert", [a], "use.safetensors", ema="use")
    merged = load_file(out)
    assert not any(n.startswith("model_ema.") for n in merged)
    unet = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert torch.equal(merged[unet], sa[ema]) and not torch.equal(merged[unet], sa[unet])


# ----------------------------------------------------------------------------- output


def test_single_file_output_is_atomic_when_cancelled(ckpts, tmp_path):
    from core.merge.executor import iter_merge

    out = tmp_path / "merged.safetensors"
    plan = merge.check(_recipe("weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]]), output=out)
    try:
        work = iter_merge(plan, out, device="cpu")
        next(work)
        next(work)
        partials = list(tmp_path.glob(".merged.safetensors.partial-*"))
        assert len(partials) == 1 and (partials[0] / "merged.safetensors").is_file()
        work.close()
    finally:
        plan.close()
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"an earlier merge")
    with pytest.raises(MergeStudioError, match="exists; pass --overwrite"):
        merge.run(_recipe("weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]]), out, device="cpu")
    from core.jobs import CancelToken

    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        merge.run(_recipe("weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]]), out, device="cpu", overwrite=True,
                  cancel=token)
    assert out.read_bytes() == b"an earlier merge" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_single_file_output_needs_single_file_inputs(llama_family, ckpts, tmp_path):
    with pytest.raises(RecipeError, match="needs single-file inputs, but model '.*' is a model folder"):
        merge.check(_recipe("weighted_sum", [llama_family["a"], llama_family["b"]]), output=tmp_path / "x.safetensors")
    with pytest.raises(RecipeError, match="is the input model"):
        merge.check(_recipe("convert", [ckpts["sd1_a"]]), output=ckpts["sd1_a"])


def test_folder_output_keeps_the_folder_layout_and_card(ckpts, tmp_path):
    out = tmp_path / "folder"
    merge.run(_recipe("weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]],
                      parameters={"alpha": {"blocks": {"OUT11": 0.9}, "default": 0.3}}), out, device="cpu")
    assert (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "## Block weights" in card and "| OUT11 | 0.9 |" in card and "| IN00 | 0.3 |" in card
    assert "SD 1.x" in card and "weighted_sum" in (out / "mergekit_config.yml").read_text()


# ----------------------------------------------------------------------------- metadata


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a1111_metadata_names_the_inputs_by_hash(ckpts, tmp_path):
    refs = [ckpts["sd1_a"], ckpts["sd1_b"], ckpts["sd1_c"]]
    out = _merge(tmp_path, "add_difference", refs, "first.safetensors", parameters={"multiplier": 0.5})
    md = _metadata(out)
    recipe = json.loads(md["sd_merge_recipe"])
    assert [recipe[f"{r}_model_hash"] for r in ("primary", "secondary", "tertiary")] == [_sha256(p) for p in refs]
    assert recipe["interp_method"] == "Add difference" and recipe["multiplier"] == 0.5
    assert recipe["save_as_half"] is True and recipe["is_inpainting"] is False and recipe["bake_in_vae"] == "None"
    models = json.loads(md["sd_merge_models"])
    assert {v["name"] for v in models.values()} == {p.name for p in refs}
    for path in refs:
        with open(path, "rb") as f:
            f.seek(1 << 20)
            legacy = hashlib.sha256(f.read(1 << 16)).hexdigest()[:8]
        assert models[_sha256(path)] == {"name": path.name, "legacy_hash": legacy, "sd_merge_recipe": None}
    assert "mergestudio_recipe" in md and "add_difference" in md["mergestudio_recipe"]
    # a merge of a merge carries the earlier recipe and models on, as A1111 does
    second = _merge(tmp_path, "weighted_sum", [out, ckpts["sd1_f32"]], "second.safetensors")
    models2 = json.loads(_metadata(second)["sd_merge_models"])
    assert set(models) < set(models2) and models2[_sha256(out)]["sd_merge_recipe"]["interp_method"] == "Add difference"


def test_legacy_hash_reads_64k_at_one_mebibyte(tmp_path):
    from core.io.sd import legacy_hash, sha256_file

    data = bytes(range(256)) * 8192  # 2 MiB
    file = tmp_path / "f.bin"
    file.write_bytes(data)
    assert legacy_hash(file) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert sha256_file(file) == hashlib.sha256(data).hexdigest()


def test_library_shows_the_recipe_of_our_outputs(ckpts, tmp_path):
    from core.io.catalog import _a1111_provenance, describe_model

    out = _merge(tmp_path, "weighted_sum", [ckpts["sd1_a"], ckpts["sd1_b"]],
                 parameters={"alpha": {"blocks": {"IN00": 1.0}, "default": 0.3}})
    info = describe_model(out)
    assert info.architecture == "Stable Diffusion 1.x" and info.provenance.tool == "Merge Studio"
    assert info.provenance.method == "weighted_sum" and "block-weighted" in info.provenance.detail
    assert info.provenance.models == (str(ckpts["sd1_a"]), str(ckpts["sd1_b"]))
    md = _metadata(out)  # what A1111 / Forge read, as the library reads them for A1111's own merges
    a1111 = _a1111_provenance(md["sd_merge_recipe"], md["sd_merge_models"])
    assert a1111.method == "Weighted sum" and a1111.models == ("sd1_a.safetensors", "sd1_b.safetensors")
    assert "multiplier 0.3" in a1111.detail


# ----------------------------------------------------------------------------- diffusers pipelines


def test_pipelines_merge_component_by_component_with_block_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    a = F.make_pipeline(tmp_path / "a", "sd1", seed=1)
    b = F.make_pipeline(tmp_path / "b", "sd1", seed=2)
    out = tmp_path / "out"
    setting = {"blocks": {"IN00": 1.0, "M00": 0.0, "BASE": 0.5}, "default": 0.25}
    merge.run(_recipe("weighted_sum", [a, b], parameters={"alpha": setting}, vae=str(b / "vae")), out, device="cpu")
    unet = lambda root: load_file(root / "unet" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    ua, ub, uo = unet(a), unet(b), unet(out)
    assert torch.equal(uo["conv_in.weight"], ub["conv_in.weight"])
    assert all(torch.equal(uo[k], ua[k]) for k in ua if k.startswith("mid_block."))
    name = "down_blocks.1.attentions.0.proj_in.weight"  # IN04
    torch.testing.assert_close(uo[name], ua[name] * 0.75 + ub[name] * 0.25)
    te = lambda root: load_file(root / "text_encoder" / "model.safetensors")  # noqa: E731
    ta, tb, to = te(a), te(b), te(out)
    norm = "final_layer_norm.weight"  # BASE: 0.5
    torch.testing.assert_close(to[norm], (ta[norm] + tb[norm]) / 2)
    vb = load_file(b / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(load_file(out / "vae" / "diffusion_pytorch_model.safetensors")[k], v) for k, v in vb.items())
    UNet2DConditionModel.from_pretrained(out / "unet")  # still loads with diffusers
    applied = json.loads(_metadata(out / "unet" / "diffusion_pytorch_model.safetensors")["mergestudio_block_weights"])
    assert applied["parameters"]["alpha"]["IN00"] == 1.0 and "VAE" not in applied["parameters"]["alpha"]


def test_input_hashes_are_cached_by_size_and_mtime(tmp_path, fresh_home):
    from core.io.sd import cached_sha256

    file = tmp_path / "m.safetensors"
    file.write_bytes(b"one")
    assert cached_sha256(file) == hashlib.sha256(b"one").hexdigest()
    store = json.loads((fresh_home / "cache" / "sha256.json").read_text())
    assert store[str(file.absolute())]["sha256"] == hashlib.sha256(b"one").hexdigest()
    file.write_bytes(b"three")  # another size: hashed again
    assert cached_sha256(file) == hashlib.sha256(b"three").hexdigest()
    assert not list((fresh_home / "cache").glob(".sha256-*"))


def test_sdxl_text_encoders_take_their_own_block_values(ckpts, tmp_path):
    a, b = ckpts["sdxl_a"], ckpts["sdxl_b"]
    setting = {"blocks": {"TE1": 0.0, "TE2": 1.0, "IN08": 1.0}, "default": 0.5}
    out = _merge(tmp_path, "weighted_sum", [a, b], parameters={"alpha": setting})
    merged, sa, sb = load_file(out), load_file(a), load_file(b)
    for name in sa:
        if name.startswith("conditioner.embedders.0."):
            assert torch.equal(merged[name], sa[name]), name
        elif name.startswith(("conditioner.embedders.1.", "model.diffusion_model.input_blocks.8.")):
            assert torch.equal(merged[name], sb[name]), name
    label = "model.diffusion_model.label_emb.0.0.weight"  # IN00, not named: the default
    torch.testing.assert_close(merged[label], ((sa[label].float() + sb[label].float()) / 2).half())
    xl = {"blocks": {"BASE": 0.0, "IN00": 1.0, "OUT08": 1.0}, "default": 0.0}
    out = _merge(tmp_path, "weighted_sum", [a, b], "xl.safetensors", parameters={"alpha": xl})
    merged = load_file(out)
    for name in sa:  # time_embed and label_emb go with IN00, the final norm and conv with OUT08
        if name.startswith(tuple(f"model.diffusion_model.{p}." for p in ("time_embed", "label_emb", "out"))):
            assert torch.equal(merged[name], sb[name]), name
        elif name.startswith("conditioner."):
            assert torch.equal(merged[name], sa[name]), name


def test_drop_works_on_any_model(llama_family, tmp_path):
    out = tmp_path / "out"
    recipe = recipe_from_dict({"merge_method": "linear", "drop": ["^model\\.layers\\.1\\.mlp\\."],
                               "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 1.0}}]})
    merge.run(recipe, out, device="cpu", model_card=False)
    names = set(load_file(out / "model.safetensors"))
    assert names and not any(n.startswith("model.layers.1.mlp.") for n in names)
    assert any(n.startswith("model.layers.0.mlp.") for n in names)


def test_a_pickle_checkpoint_converts_to_one_safetensors_file(ckpts, tmp_path):
    state = load_file(ckpts["sd1_a"])
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": state}, ckpt)
    out = tmp_path / "new.safetensors"
    merge.run(_recipe("convert", [ckpt]), out, device="cpu", allow_pickle=True)
    merged = load_file(out)
    assert set(merged) == set(state) and all(torch.equal(merged[k], v) for k, v in state.items())
    assert json.loads(_metadata(out)["sd_merge_models"])[_sha256(ckpt)]["name"] == "old.ckpt"


def test_formula_lines_say_which_way_the_ratio_goes():
    from core.merge.document import RecipeDocument

    doc = RecipeDocument()
    doc.set_method("weighted_sum")
    doc.add_model("/m/base.safetensors", "base")
    doc.add_model("/m/anime.safetensors", "anime")
    doc.set_param("alpha", 0.3)
    assert doc.formula() == "0.70 × base + 0.30 × anime"
    doc.set_param("alpha", {"blocks": {"IN00": 1.0}, "default": 0.4})
    assert "per block (others 0.40)" in doc.formula()
    doc.set_method("add_difference")
    doc.add_model("/m/sd15.safetensors", "sd15")
    assert doc.formula() == "base + 1.00 × (anime − sd15)"


def test_non_weights_come_from_model_a_or_the_model_that_has_them(ckpts, tmp_path):
    pruned = F.make_checkpoint(tmp_path / "pruned.safetensors", "sd1", seed=2, buffers=False)
    for order in ([ckpts["sd1_a"], pruned], [pruned, ckpts["sd1_a"]]):
        plan = merge.check(_recipe("weighted_sum", order))
        try:
            betas = next(op for op in plan.ops if op.out_name == "betas")
            assert betas.copy and plan.models[betas.inputs[0][0]].ref == str(ckpts["sd1_a"])
            assert any(f"'betas' (not a weight) is missing from model '{pruned}'" in n for n in plan.notes)
        finally:
            plan.close()
