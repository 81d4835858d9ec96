"""Model access (headers, layouts) and the sharded, atomic writer."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import MergeStudioError, ModelError
from core.io.formats import open_model
from core.io.tensors import read_header
from core.io.writer import AtomicOutput, OutputTensor, ShardedWriter, plan_shards, write_index
from tests.fixtures.tiny_models import read_state_dict

# ----------------------------------------------------------------------------- read_header


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_read_header_of_a_good_file(tmp_path):
    file = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(file), metadata={"k": "v"})
    header = read_header(file)
    assert header.metadata == {"k": "v"}
    assert header.tensors["a"].shape == (2, 3) and header.tensors["a"].dtype == "F32"
    assert header.tensors["a"].nbytes == 24 and header.tensors["b"].nbytes == 32
    raw = file.read_bytes()
    a = header.tensors["a"]
    assert raw[a.offset:a.offset + a.nbytes] == bytes(24)  # absolute offsets


@pytest.mark.parametrize("kind", ["corrupt_header", "corrupt_header_length"])
def test_read_header_corrupt(kind, bad_models):
    bad = bad_models[kind]
    with pytest.raises(ModelError) as info:
        read_header(bad.file)
    message = str(info.value)
    assert str(bad.file) in message and "corrupt" in message and "\n" not in message


def test_read_header_truncated_names_file_and_tensor(bad_models):
    bad = bad_models.truncated
    with pytest.raises(ModelError) as info:
        read_header(bad.file)
    message = str(info.value)
    assert str(bad.file) in message and f"'{bad.tensor}'" in message and "truncated" in message


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), ["not a safetensors file", "2 bytes"]),
        (lambda p: p.write_bytes(b""), ["not a safetensors file"]),
        (lambda p: _raw_file(p, b"[1, 2]"), ["corrupt"]),
        (lambda p: _raw_file(p, {"__metadata__": [1]}), ["__metadata__"]),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [2]}}), ["'w'", "corrupt"]),
        (lambda p: _raw_file(p, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), ["'w'", "Q4"]),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), ["'w'", "12 bytes"]),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)), ["'w'", "truncated"]),
        (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8)), ["'w'"]),
        (lambda p: _raw_file(p, {}, length=1000), ["corrupt", "header length 1000"]),
    ],
    ids=["two-bytes", "empty", "not-an-object", "bad-metadata", "no-offsets", "dtype", "span", "short-data", "negative", "length"],
)
def test_read_header_rejects(build, words, tmp_path):
    file = tmp_path / "bad.safetensors"
    build(file)
    with pytest.raises(ModelError) as info:
        read_header(file)
    message = str(info.value)
    assert str(file) in message and "\n" not in message
    for word in words:
        assert word in message, message


def test_read_header_of_a_folder_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        read_header(tmp_path)


# ----------------------------------------------------------------------------- open_model


def test_open_transformers_folder(llama_family):
    path = llama_family["a"]
    model = open_model(path)
    try:
        assert model.kind == "transformers" and model.config["model_type"] == "llama"
        assert model.weight_files == [path / "model.safetensors"]
        state = read_state_dict(path)
        assert set(model.tensors) == set(state)
        name = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(model.get(name), state[name])
        assert model.num_parameters() == sum(t.numel() for t in state.values())
        with pytest.raises(ModelError, match="no tensor 'nope'"):
            model.get("nope")
    finally:
        model.close()


def test_open_sharded_folder(llama_sharded, llama_family):
    model = open_model(llama_sharded)
    try:
        assert model.kind == "transformers" and model.config is not None
        assert len(model.weight_files) > 1
        state = read_state_dict(llama_family["base"])
        assert set(model.tensors) == set(state)
        for name in state:
            assert torch.equal(model.get(name), state[name]), name
    finally:
        model.close()


def test_open_single_file(single_file_ckpt, llama_family):
    model = open_model(single_file_ckpt)
    try:
        assert model.kind == "single_file" and model.config is None
        state = read_state_dict(llama_family["base"])
        assert set(model.tensors) == set(state)
        assert torch.equal(model.get("model.norm.weight"), state["model.norm.weight"])
    finally:
        model.close()


def test_open_folder_with_one_loose_safetensors_file(single_file_ckpt, tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    (folder / "my-merge.safetensors").write_bytes(single_file_ckpt.read_bytes())
    model = open_model(folder)
    assert model.kind == "single_file" and model.weight_files == [folder / "my-merge.safetensors"]


def test_open_diffusers_pipeline(diffusers_pipelines):
    path = diffusers_pipelines["a"]
    model = open_model(path)
    try:
        assert model.kind == "diffusers"
        assert set(model.components) == {"unet", "text_encoder", "vae"}
        assert "unet/conv_in.weight" in model.tensors
        assert "text_encoder/text_model.final_layer_norm.weight" in model.tensors
        expected = read_state_dict(path / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
        assert torch.equal(model.get("unet/conv_in.weight"), expected)
        assert len(model.all_weight_files()) == 3
    finally:
        model.close()


def test_pickle_is_refused_by_default(bad_models):
    bad = bad_models.pickle_only
    with pytest.raises(ModelError) as info:
        open_model(bad.path)
    assert str(bad.file) in str(info.value) and "--allow-pickle" in str(info.value)
    with pytest.raises(ModelError, match="--allow-pickle"):
        open_model(bad.file)  # the file itself, too


def test_pickle_is_loaded_when_allowed(bad_models, llama_family):
    model = open_model(bad_models.pickle_only.path, allow_pickle=True)
    try:
        assert model.kind == "pickle" and model.config is not None
        state = read_state_dict(llama_family["base"])
        assert set(model.tensors) == set(state)
        for name in state:
            assert torch.equal(model.get(name), state[name])
            assert model.tensors[name].shape == tuple(state[name].shape)
    finally:
        model.close()


class NotAllowed:
    """A class weights_only=True must refuse to build."""


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    file = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "obj": NotAllowed()}, file)
    with pytest.raises(ModelError, match="weights_only=True") as info:
        open_model(file, allow_pickle=True)
    assert str(file) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("what", ["missing", "empty_folder", "readme_only", "text_file"])
def test_not_a_model(what, tmp_path, bad_models):
    path = {
        "missing": tmp_path / "nope",
        "empty_folder": tmp_path,
        "readme_only": bad_models.not_a_model.path,
        "text_file": bad_models.not_a_model.file,
    }[what]
    with pytest.raises(ModelError) as info:
        open_model(path)
    assert str(path) in str(info.value)


def test_sharded_index_problems(llama_sharded, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_sharded, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError) as info:
        open_model(broken)
    assert shard.name in str(info.value) and "does not exist" in str(info.value)

    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot parse JSON"):
        open_model(broken)
    (broken / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelError, match="weight_map"):
        open_model(broken)


# ----------------------------------------------------------------------------- writer


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "layers.0.f16": torch.randn(3, generator=g).to(torch.float16),
        "layers.0.scale": torch.tensor(1.5),  # 0-d
        "layers.0.empty": torch.zeros(0, 4),
        "layers.1.ids": torch.arange(7, dtype=torch.int64),
        "layers.1.mask": torch.tensor([True, False, True]),
        "layers.1.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "layers.1.noncontig": torch.randn(6, 4, generator=g).t(),
        "head.weight": torch.randn(32, 8, generator=g),
    }


_NAMES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.bool: "BOOL", torch.float64: "F64",
}


def _write(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int, metadata=None) -> list:
    plan = [OutputTensor(n, tuple(t.shape), _NAMES[t.dtype]) for n, t in tensors.items()]
    shards = plan_shards(plan, max_bytes, metadata or {"format": "pt"})
    writer = ShardedWriter(folder, shards)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    write_index(folder, shards)
    return shards


def _read_back(folder: Path, shards) -> dict[str, torch.Tensor]:
    out = {}
    for shard in shards:
        with safe_open(str(folder / shard.file_name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


@pytest.mark.parametrize("max_bytes", [10**9, 200], ids=["one-shard", "many-shards"])
def test_sharded_writer_round_trip(max_bytes, tmp_path):
    tensors = _tensors()
    shards = _write(tmp_path, tensors, max_bytes)
    if max_bytes > 10**6:
        assert [s.file_name for s in shards] == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(shards) > 3
        assert shards[0].file_name == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {t.name: s.file_name for s in shards for t in s.tensors}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for s in shards:  # a shard exceeds the limit only when it holds one big tensor
            assert s.data_bytes <= max_bytes or len(s.tensors) == 1
    back = _read_back(tmp_path, shards)
    assert list(back) == list(tensors) or set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    for shard in shards:  # the data starts 8-byte aligned and the file has no slack
        raw = (tmp_path / shard.file_name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 8 == 0
        assert len(raw) == 8 + n + shard.data_bytes
        read_header(tmp_path / shard.file_name)  # our own checker accepts it


def test_writer_refuses_out_of_order_and_early_finish(tmp_path):
    tensors = _tensors()
    plan = [OutputTensor(n, tuple(t.shape), _NAMES[t.dtype]) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan_shards(plan, 10**9, {}))
    with pytest.raises(RuntimeError, match="expected tensor 'embed.weight'"):
        writer.write("head.weight", tensors["head.weight"])
    with pytest.raises(RuntimeError, match="shape"):
        writer.write("embed.weight", torch.zeros(3))
    writer.write("embed.weight", tensors["embed.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.abort()


def test_writer_disk_full(tmp_path, monkeypatch):
    import builtins

    import core.io.writer as writer_module

    class Full:
        def __init__(self, handle):
            self.handle, self.left = handle, 100

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if n > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= n
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(writer_module, "open", lambda f, m="r": Full(builtins.open(f, m)), raising=False)
    tensors = _tensors()
    with pytest.raises(MergeStudioError, match="disk is full") as info:
        _write(tmp_path, tensors, 10**9)
    assert "model.safetensors" in str(info.value)


# ----------------------------------------------------------------------------- AtomicOutput


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_atomic_output_success_and_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError):
        with AtomicOutput(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise ValueError("boom")
    assert not target.exists() and _hidden(tmp_path, "out") == []

    with AtomicOutput(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        (tmp / "model.safetensors").write_bytes(b"new")
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert _hidden(tmp_path, "out") == []


def test_atomic_output_keeps_existing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "sentinel").write_text("old")
    with pytest.raises(MergeStudioError, match="not empty; pass --overwrite"):
        with AtomicOutput(target):
            pass
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(target, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["sentinel"]
    assert _hidden(tmp_path, "out") == []

    with AtomicOutput(target, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert _hidden(tmp_path, "out") == []


def test_atomic_output_empty_existing_folder_is_fine(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with AtomicOutput(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"


def test_atomic_output_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeStudioError, match="not a folder"):
        AtomicOutput(tmp_path / "file", overwrite=True).check()
    with pytest.raises(MergeStudioError, match="parent folder does not exist"):
        AtomicOutput(tmp_path / "a" / "b").check()


# ----------------------------------------------------------------------------- catalog


def test_models_by_hub_id_from_the_local_cache(llama_family, tmp_path, monkeypatch):
    import shutil

    from core.io.catalog import resolve_model

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(llama_family["a"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model("tiny-org/tiny-llama") == snapshot
    assert resolve_model("tiny-org/tiny-llama@0123abcd") == snapshot
    with pytest.raises(ModelError) as info:
        resolve_model("tiny-org/not-there")
    assert "'tiny-org/not-there'" in str(info.value) and str(hub) in str(info.value)


def test_relative_paths_resolve_against_the_recipe_folder(llama_family, tmp_path, monkeypatch):
    from core.io.catalog import resolve_model

    recipe_dir = llama_family["a"].parent
    monkeypatch.chdir(tmp_path)
    assert resolve_model(llama_family["a"].name, recipe_dir) == recipe_dir / llama_family["a"].name
    with pytest.raises(ModelError, match="was not found"):
        resolve_model(llama_family["a"].name)


def test_pickle_formats_when_allowed(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    model = open_model(legacy, allow_pickle=True)
    assert model.kind == "pickle" and torch.equal(model.get("w"), torch.arange(3.0))

    lightning = tmp_path / "sd.ckpt"  # A1111-style: tensors under "state_dict", counters beside them
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "epoch": 3, "global_step": 10}, lightning)
    model = open_model(lightning, allow_pickle=True)
    assert list(model.tensors) == ["w"] and model.tensors["w"].shape == (2, 2)

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.ones(2)], not_a_dict)
    with pytest.raises(ModelError, match="dictionary of tensors") as info:
        open_model(not_a_dict, allow_pickle=True)
    assert str(not_a_dict) in str(info.value)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError) as info:
        open_model(garbage, allow_pickle=True)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)
