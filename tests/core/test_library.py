"""The model library: describing models from headers only, scanning folders, the Qt-free model.

Covers ModelInfo fields against values computed independently from the files,
single-file architecture recognition, the three kinds of provenance (ours,
mergekit, A1111) and unreadable provenance, header fingerprints, and a scan of
a tree with ~200 subfolders, nested models, corrupt and pickle-only models, a
symbolic-link loop, hidden and partial folders, a depth limit and a fake
Hugging Face cache; then ModelLibrary's folders, batches, rescans, filter and
events.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import core.io.formats as formats
import core.merge as merge
from core.errors import ModelError
from core.io.catalog import checkpoint_architecture, describe_model, header_hash
from core.io.tensors import SafetensorsReader
from core.library import HF_CACHE_SOURCE, ModelLibrary, ScanSummary, iter_scan

A1111_RECIPE = {
    "type": "webui",
    "primary_model_hash": "aaa111",
    "secondary_model_hash": "bbb222",
    "tertiary_model_hash": None,
    "interp_method": "Weighted sum",
    "multiplier": 0.3,
    "save_as_half": True,
}
A1111_MODELS = {
    "bbb222": {"name": "anime-v3", "legacy_hash": "22"},
    "aaa111": {"name": "photo-real-v1", "legacy_hash": "11"},
}


# ----------------------------------------------------------------------------- helpers


def tiny_model(folder: Path, *, hidden: int = 4, layers: int = 2, dtype=torch.float32, metadata=None) -> Path:
    """A transformers-style folder with a handful of tiny tensors (a few hundred bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["TinyForCausalLM"], "model_type": "tiny", "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(config))
    state = {"model.embed.weight": torch.zeros(8, hidden, dtype=dtype)}
    for i in range(layers):
        state[f"model.layers.{i}.proj.weight"] = torch.zeros(hidden, hidden, dtype=dtype)
    save_file(state, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})
    return folder


def single_file(path: Path, names: list[str], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.zeros(2, 2) for n in names}, str(path), metadata=metadata)
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_tensor_reads(monkeypatch) -> None:
    def refuse(self, name, device="cpu"):
        raise AssertionError(f"tensor data was read: {name}")

    monkeypatch.setattr(SafetensorsReader, "get", refuse)


def drain(work):
    batches = []
    try:
        while True:
            batches.append(next(work))
    except StopIteration as stop:
        return batches, stop.value


def linear_recipe(folder: Path, *models: Path) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def merged_model(llama_family, tmp_path_factory) -> Path:
    """A real Merge Studio output (linear of a and b)."""
    folder = tmp_path_factory.mktemp("merged")
    out = folder / "merged-linear"
    merge.run(linear_recipe(folder, llama_family["a"], llama_family["b"]), out, device="cpu")
    return out


def fake_mergekit_output(src: Path, dst: Path, *, with_config: bool = True) -> Path:
    """A copy of ``src`` with what mergekit writes beside the weights."""
    copy_model(src, dst)
    recipe = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/one\n  - model: org/two\n"
    if with_config:
        (dst / "mergekit_config.yml").write_text(recipe)
    (dst / "README.md").write_text(
        "---\nbase_model:\n- org/one\n- org/two\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n---\n"
        f"# {dst.name}\n\nA merge made with mergekit.\n\n### Configuration\n\n```yaml\n{recipe}```\n"
    )
    return dst


# ----------------------------------------------------------------------------- describe_model


def test_describe_a_transformers_folder(llama_family, monkeypatch):
    from safetensors import safe_open

    no_tensor_reads(monkeypatch)
    path = llama_family["base"]
    info = describe_model(path, source="my models")
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert info.path == path and info.name == path.name and info.kind == "transformers"
    assert info.architecture == config["architectures"][0] == "LlamaForCausalLM"
    assert info.model_type == "llama" and info.layer_count == config["num_hidden_layers"]
    assert info.num_parameters == params
    assert info.dtype == "F32"
    assert info.size_bytes == (path / "model.safetensors").stat().st_size
    assert info.modified == (path / "model.safetensors").stat().st_mtime
    assert info.source == "my models" and info.provenance is None
    assert info.header_hash == header_hash(path)
    assert json.loads(json.dumps(info.to_dict()))["num_parameters"] == params


def test_sharded_and_bf16_models(llama_sharded, llama_family_bf16):
    sharded = describe_model(llama_sharded)
    shards = sorted(llama_sharded.glob("*.safetensors"))
    assert len(shards) > 1
    assert sharded.size_bytes == sum(f.stat().st_size for f in shards)
    assert sharded.modified == max(f.stat().st_mtime for f in shards)
    assert describe_model(llama_family_bf16["a"]).dtype == "BF16"


def test_dtype_is_the_one_holding_most_elements(tmp_path):
    folder = tmp_path / "mostly-bf16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    save_file(
        {"big": torch.zeros(64, 64, dtype=torch.bfloat16), "norm1": torch.zeros(64), "norm2": torch.zeros(64)},
        str(folder / "model.safetensors"),
    )
    info = describe_model(folder)
    assert info.dtype == "BF16"
    assert info.architecture == "tiny" and info.model_type == "tiny"  # no `architectures`: the model type


def test_diffusers_pipeline(diffusers_pipelines):
    path = diffusers_pipelines["a"]
    info = describe_model(path)
    files = sorted(path.glob("*/*.safetensors"))
    assert info.kind == "diffusers" and info.architecture == "StableDiffusionPipeline"
    assert info.size_bytes == sum(f.stat().st_size for f in files)
    assert info.layer_count is None and info.model_type is None


@pytest.mark.parametrize(
    "names, architecture",
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x.weight"],
         "Stable Diffusion 1.x"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.transformer.resblocks.0.w"],
         "Stable Diffusion 2.x"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.text_model.w",
          "conditioner.embedders.1.model.ln_final.weight"], "Stable Diffusion XL"),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "safetensors checkpoint"),
    ],
)
def test_single_file_checkpoints_are_recognised_from_their_keys(tmp_path, names, architecture):
    file = single_file(tmp_path / "ckpt.safetensors", names)
    info = describe_model(file)
    assert info.kind == "single_file" and info.architecture == architecture
    assert info.name == "ckpt" and info.path == file
    assert checkpoint_architecture(names)[0] == architecture


def test_bad_models_are_one_sentence_errors(bad_models, tmp_path):
    with pytest.raises(ModelError) as info:
        describe_model(bad_models.corrupt_header.path)
    assert str(bad_models.corrupt_header.file) in str(info.value)
    with pytest.raises(ModelError) as info:
        describe_model(bad_models.truncated.path)
    assert "truncated" in str(info.value) and str(bad_models.truncated.file) in str(info.value)
    with pytest.raises(ModelError, match="pickle"):
        describe_model(bad_models.pickle_only.path)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(ModelError, match="holds no tensors"):
        describe_model(empty)


def test_header_hash_covers_config_and_headers_but_not_tensor_data(llama_family, tmp_path):
    a = copy_model(llama_family["base"], tmp_path / "a")
    original = header_hash(a)
    assert header_hash(copy_model(a, tmp_path / "elsewhere")) == original

    weights = a / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length + 10] ^= 0xFF  # a byte of tensor data: the fingerprint does not read it
    weights.write_bytes(bytes(data))
    assert header_hash(a) == original

    config = json.loads((a / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (a / "config.json").write_text(json.dumps(config))
    changed = header_hash(a)
    assert changed != original

    state = {"extra": torch.zeros(1)}
    save_file(state, str(tmp_path / "b.safetensors"))
    save_file({"extra": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    assert header_hash(tmp_path / "b.safetensors") != header_hash(tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------- provenance


def test_merge_studio_provenance(merged_model, llama_family):
    info = describe_model(merged_model)
    prov = info.provenance
    assert prov is not None and prov.tool == "Merge Studio"  # even though mergekit_config.yml is there too
    assert (merged_model / "mergekit_config.yml").is_file()
    assert prov.method == "linear"
    assert prov.models == (str(llama_family["a"]), str(llama_family["b"]))
    assert prov.detail == "linear of 2 models"
    assert yaml.safe_load(prov.recipe)["merge_method"] == "linear"


def test_mergekit_provenance_from_its_config_or_its_model_card(llama_family, tmp_path):
    with_config = fake_mergekit_output(llama_family["a"], tmp_path / "mk")
    prov = describe_model(with_config).provenance
    assert prov is not None and prov.tool == "mergekit" and prov.method == "ties"
    assert prov.models == ("org/one", "org/two", "org/base")
    assert prov.detail == "ties of 3 models"
    assert prov.recipe == (with_config / "mergekit_config.yml").read_text()

    card_only = fake_mergekit_output(llama_family["a"], tmp_path / "mk-card", with_config=False)
    prov = describe_model(card_only).provenance
    assert prov is not None and (prov.tool, prov.method) == ("mergekit", "ties")

    # A card tagged mergekit without a recipe block: the models from its front matter.
    (card_only / "README.md").write_text("---\ntags: [mergekit]\nbase_model: [org/x]\n---\n# A merge\n")
    prov = describe_model(card_only).provenance
    assert prov is not None and prov.method is None and prov.models == ("org/x",)

    # A card without the tag is not provenance.
    (card_only / "README.md").write_text("---\ntags: [text-generation]\n---\n# A model\n")
    assert describe_model(card_only).provenance is None


def test_a1111_provenance(tmp_path):
    file = single_file(
        tmp_path / "sd-merge.safetensors",
        ["model.diffusion_model.out.0.weight", "cond_stage_model.transformer.text_model.final.weight"],
        {"sd_merge_recipe": json.dumps(A1111_RECIPE), "sd_merge_models": json.dumps(A1111_MODELS)},
    )
    info = describe_model(file)
    prov = info.provenance
    assert info.architecture == "Stable Diffusion 1.x"
    assert prov is not None and prov.tool == "A1111" and prov.method == "Weighted sum"
    assert prov.models == ("photo-real-v1", "anime-v3")  # primary, then secondary
    assert prov.detail == "Weighted sum of 2 models, multiplier 0.3"
    assert json.loads(prov.recipe) == A1111_RECIPE


def test_unreadable_provenance_is_not_an_error(tmp_path, llama_family):
    file = single_file(tmp_path / "odd.safetensors", ["w"], {"sd_merge_recipe": "{not json"})
    prov = describe_model(file).provenance
    assert prov is not None and prov.tool == "A1111" and prov.method is None
    assert "could not be read" in prov.detail and prov.recipe == "{not json"

    ours = tiny_model(tmp_path / "ours", metadata={"mergestudio_recipe": "merge_method: [unclosed"})
    prov = describe_model(ours).provenance
    assert prov is not None and prov.tool == "Merge Studio" and "could not be read" in prov.detail

    mk = copy_model(llama_family["a"], tmp_path / "mk")
    (mk / "mergekit_config.yml").write_text("models: []\n")  # no merge_method
    prov = describe_model(mk).provenance
    assert prov is not None and prov.tool == "mergekit" and "could not be read" in prov.detail


# ----------------------------------------------------------------------------- scanning


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, llama_family) -> Path:
    """A fake HF cache: one repo with refs/main, one with two snapshots and no refs, one without weights."""
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    copy_model(llama_family["a"], repo / "snapshots" / "1111")
    tiny_model(repo / "snapshots" / "2222")  # newer, but refs/main names 1111
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1111\n")
    other = hub / "models--other--two-revs"
    old = tiny_model(other / "snapshots" / "old", layers=1)
    new = tiny_model(other / "snapshots" / "new", layers=3)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    config_only = hub / "models--org--config-only" / "snapshots" / "abcd"
    config_only.mkdir(parents=True)
    (config_only / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def library_tree(tmp_path, llama_family, bad_models, merged_model, diffusers_pipelines) -> Path:
    """A library folder with every kind of entry a real one has."""
    root = tmp_path / "library"
    many = root / "many"
    for i in range(150):
        (many / f"empty-{i:03d}").mkdir(parents=True)
    for i in range(50):
        tiny_model(many / f"tiny-{i:03d}")
    copy_model(llama_family["base"], root / "nested" / "deeper" / "llama-base")
    inner = tiny_model(root / "nested" / "deeper" / "llama-base" / "not-searched")  # inside a model folder
    assert inner.is_dir()
    copy_model(diffusers_pipelines["a"], root / "pipelines" / "tiny-sd")  # its components are not models
    copy_model(bad_models.corrupt_header.path, root / "broken" / "corrupt")
    copy_model(bad_models.pickle_only.path, root / "broken" / "pickle-only")
    copy_model(merged_model, root / "merges" / "merged-linear")
    fake_mergekit_output(llama_family["b"], root / "merges" / "mergekit-ties")
    single_file(
        root / "checkpoints" / "sd-merge.safetensors",
        ["model.diffusion_model.out.0.weight", "cond_stage_model.transformer.text_model.final.weight"],
        {"sd_merge_recipe": json.dumps(A1111_RECIPE), "sd_merge_models": json.dumps(A1111_MODELS)},
    )
    torch.save({"w": torch.zeros(1)}, root / "checkpoints" / "old-style.ckpt")
    tiny_model(root / ".hidden" / "secret")
    tiny_model(root / "merges" / ".merged-linear.partial-x1y2")
    tiny_model(root / "merges" / ".merged-linear.old-x1y2")
    (root / "__pycache__").mkdir()
    os.symlink(root, root / "nested" / "loop")  # a link back to the top: searched once
    os.symlink(root / "many" / "tiny-000", root / "zz-link-to-tiny")  # the same model twice: listed once
    return root


def test_scan_finds_models_and_reports_problems(library_tree, hf_cache, monkeypatch):
    no_tensor_reads(monkeypatch)
    reads: list[Path] = []
    real_read_header = formats.read_header
    monkeypatch.setattr(formats, "read_header", lambda p: reads.append(Path(p)) or real_read_header(p))

    batches, summary = drain(iter_scan([library_tree], batch_size=16))

    models = [m for b in batches for m in b.models]
    problems = [p for b in batches for p in b.problems]
    by_path = {m.path: m for m in models}
    assert len(by_path) == len(models)  # every model once: the loop and the link add nothing
    local = {m.path.relative_to(library_tree).as_posix() for m in models if m.source == str(library_tree)}
    expected = {f"many/tiny-{i:03d}" for i in range(50)} | {
        "nested/deeper/llama-base",
        "merges/merged-linear",
        "merges/mergekit-ties",
        "checkpoints/sd-merge.safetensors",
        "pipelines/tiny-sd",
    }
    assert local == expected
    tools = {m.name: m.provenance.tool for m in models if m.provenance is not None}
    assert tools == {"merged-linear": "Merge Studio", "mergekit-ties": "mergekit", "sd-merge": "A1111"}
    assert by_path[library_tree / "pipelines" / "tiny-sd"].kind == "diffusers"

    cached = {m.name: m for m in models if m.source == HF_CACHE_SOURCE}
    assert set(cached) == {"tiny-org/tiny-llama", "other/two-revs"}
    assert cached["tiny-org/tiny-llama"].path == hf_cache / "models--tiny-org--tiny-llama" / "snapshots" / "1111"
    assert cached["other/two-revs"].path.name == "new" and cached["other/two-revs"].layer_count == 3

    messages = {p.path.relative_to(library_tree).as_posix(): p.message
                for p in problems if p.path.is_relative_to(library_tree)}
    assert set(messages) == {"broken/corrupt", "broken/pickle-only", "checkpoints/old-style.ckpt"}
    corrupt = messages["broken/corrupt"]  # the model's entry, with the sentence naming the file
    assert "corrupt safetensors header" in corrupt and str(library_tree / "broken/corrupt/model.safetensors") in corrupt
    assert "pickle" in messages["broken/pickle-only"] and "allow pickle" in messages["broken/pickle-only"]
    assert str(library_tree / "broken" / "pickle-only") in messages["broken/pickle-only"]
    cache_problems = [p for p in problems if p.path.is_relative_to(hf_cache)]
    assert len(cache_problems) == 1 and "org/config-only holds no weights" in cache_problems[0].message

    assert all(len(b.models) + len(b.problems) <= 16 for b in batches) and len(batches) > 2
    assert batches[-1].progress.done == batches[-1].progress.total == 2  # the library folder, then the cache
    assert summary == ScanSummary(
        [str(library_tree), HF_CACHE_SOURCE], len(models), len(problems), [], summary.seconds
    )
    # Each weight file's header is parsed once; no other file is opened as weights.
    pipeline_files = len(list((library_tree / "pipelines" / "tiny-sd").glob("*/*.safetensors")))
    assert len(reads) == len(set(reads)) == len(models) - 1 + pipeline_files + 1  # + the corrupt one


def test_folders_below_max_depth_are_reported_not_silently_skipped(tmp_path):
    root = tmp_path / "deep"
    tiny_model(root / "a" / "model-at-2")
    tiny_model(root / "a" / "b" / "c" / "model-at-4")
    batches, summary = drain(iter_scan([root], hf_cache=False, max_depth=2))
    models = [m.name for b in batches for m in b.models]
    problems = [p for b in batches for p in b.problems]
    assert models == ["model-at-2"]
    assert [p.path for p in problems] == [root / "a" / "b" / "c"]
    assert "not searched" in problems[0].message and "2 folders" in problems[0].message
    assert summary.problems == 1
    batches, _ = drain(iter_scan([root], hf_cache=False, max_depth=4))
    assert sorted(m.name for b in batches for m in b.models) == ["model-at-2", "model-at-4"]


def test_missing_and_empty_roots(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    batches, summary = drain(iter_scan([tmp_path / "nope", tmp_path / "empty", tmp_path / "a-file"], hf_cache=False))
    problems = {p.path.name: p.message for b in batches for p in b.problems}
    assert problems["nope"].endswith("does not exist.") and str(tmp_path / "nope") in problems["nope"]
    assert "is not a folder" in problems["a-file"]
    assert summary.roots == [str(tmp_path / "empty")] and summary.empty_roots == [str(tmp_path / "empty")]
    assert summary.models == 0 and summary.problems == 2


def test_a_caller_can_stop_between_batches(tmp_path):
    for i in range(40):
        tiny_model(tmp_path / "lib" / f"m{i:02d}")
    work = iter_scan([tmp_path / "lib"], hf_cache=False, batch_size=8)
    first = next(work)
    assert [m.name for m in first.models] == [f"m{i:02d}" for i in range(8)]
    work.close()
    with pytest.raises(StopIteration):
        next(work)


# ----------------------------------------------------------------------------- ModelLibrary


class Recorder:
    def __init__(self, library: ModelLibrary) -> None:
        self.counts = {"folders": 0, "models": 0, "problems": 0}
        library.events.folders_changed.connect(lambda: self.bump("folders"))
        library.events.models_changed.connect(lambda: self.bump("models"))
        library.events.problems_changed.connect(lambda: self.bump("problems"))

    def bump(self, name: str) -> None:
        self.counts[name] += 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {k: 0 for k in self.counts}
        return counts


def test_library_folders(tmp_path):
    library = ModelLibrary()
    seen = Recorder(library)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert library.add_folder(tmp_path / "one" / ".." / "one") == (tmp_path / "one").resolve()
    library.add_folder(tmp_path / "two")
    library.add_folder(tmp_path / "one")  # a duplicate: nothing happens
    assert library.folders == [(tmp_path / "one").resolve(), (tmp_path / "two").resolve()]
    assert seen.take()["folders"] == 2
    with pytest.raises(ModelError, match="does not exist"):
        library.add_folder(tmp_path / "three")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="is not a folder"):
        library.add_folder(tmp_path / "file")
    assert len(library.folders) == 2 and seen.take()["folders"] == 0


def test_library_scans_filters_and_rescans(tmp_path, llama_family, merged_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    lib_a = tmp_path / "a"
    lib_b = tmp_path / "b"
    copy_model(llama_family["base"], lib_a / "Llama-Base")
    copy_model(merged_model, lib_a / "my-merge")
    tiny_model(lib_a / "tiny-bf16", dtype=torch.bfloat16)
    tiny_model(lib_b / "zeta")
    copy_model(llama_family["c"], lib_b / "broken")
    (lib_b / "broken" / "model.safetensors").write_bytes(b"\x00" * 4)

    library = ModelLibrary([lib_a, lib_b])
    seen = Recorder(library)
    summary = library.refresh()
    assert summary.models == 4 and summary.problems == 1
    assert [m.name for m in library.models] == ["Llama-Base", "my-merge", "tiny-bf16", "zeta"]
    assert [p.path for p in library.problems] == [(lib_b / "broken").resolve()]
    assert str((lib_b / "broken" / "model.safetensors").resolve()) in library.problems[0].message
    assert seen.counts["models"] >= 1 and seen.counts["problems"] >= 1
    seen.take()

    assert [m.name for m in library.filter("LLAMA f32")] == ["Llama-Base", "my-merge"]
    assert [m.name for m in library.filter("merge studio linear")] == ["my-merge"]
    assert [m.name for m in library.filter("bf16")] == ["tiny-bf16"]
    assert [m.name for m in library.filter(f"{lib_b.name}/zeta")] == ["zeta"]
    assert library.filter("nothing-like-this") == [] and len(library.filter("  ")) == 4
    assert library.get(lib_a / "my-merge").provenance.method == "linear"

    # A model deleted and another fixed: a rescan drops the first and replaces the problem.
    shutil.rmtree(lib_a / "tiny-bf16")
    shutil.copy2(llama_family["c"] / "model.safetensors", lib_b / "broken" / "model.safetensors")
    library.refresh()
    assert [m.name for m in library.models] == ["broken", "Llama-Base", "my-merge", "zeta"]
    assert library.problems == []
    assert seen.take()["problems"] >= 1

    library.remove_folder(lib_a)
    assert [m.name for m in library.models] == ["broken", "zeta"]
    assert seen.take() == {"folders": 1, "models": 1, "problems": 0}

    # A library folder that vanished: its models go, the problem says why.
    shutil.rmtree(lib_b)
    library.refresh()
    assert library.models == []
    assert [p.message for p in library.problems] == [f"{lib_b.resolve()}: library folder does not exist."]


def test_batches_applied_one_by_one_update_the_views(tmp_path):
    for i in range(5):
        tiny_model(tmp_path / "lib" / f"m{i}")
    library = ModelLibrary([tmp_path / "lib"])
    seen = Recorder(library)
    shown: list[int] = []
    library.events.models_changed.connect(lambda: shown.append(len(library.models)))
    library.begin_scan(library.folders)
    work = iter_scan(library.folders, hf_cache=False, batch_size=2)
    batches, summary = drain(work)
    for batch in batches:
        library.apply(batch)
    library.finish_scan(summary)
    assert shown == [2, 4, 5] and seen.counts["problems"] == 0


def test_add_model_describes_one_model(tmp_path, merged_model):
    lib = tmp_path / "lib"
    lib.mkdir()
    library = ModelLibrary([lib])
    seen = Recorder(library)
    out = copy_model(merged_model, lib / "fresh-merge")
    info = library.add_model(out)
    assert info.source == str(lib.resolve()) and info.provenance.tool == "Merge Studio"
    assert library.get(out) == info and seen.take()["models"] == 1
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        library.add_model(tmp_path / "junk")
    assert library.models == [info] and seen.take()["models"] == 0
