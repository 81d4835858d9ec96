"""The streaming executor: progress, cancel and clean-up, errors, reproducibility."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import core.merge as merge
from core.errors import CancelledError, MergeStudioError
from core.jobs import CancelToken, Progress, drive
from core.merge.executor import iter_merge
from tests.fixtures.tiny_models import read_state_dict


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(a: Path, b: Path, wa: float = 0.3, wb: float = 0.7) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": wa}}, {"model": str(b), "parameters": {"weight": wb}}],
    }


def leftovers(output: Path) -> list[str]:
    return sorted(
        p.name for p in output.parent.iterdir() if p.name.startswith((f".{output.name}.partial-", f".{output.name}.old-"))
    )


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def linear_recipe(llama_family, tmp_path) -> Path:
    return write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))


# ----------------------------------------------------------------------------- progress


def test_progress_reports_every_tensor(linear_recipe, tmp_path, llama_family):
    plan = merge.check(linear_recipe)
    n_ops, out_bytes = len(plan.ops), plan.output_bytes
    names = [op.out_name for op in plan.ops]
    plan.close()
    seen: list[Progress] = []
    result = merge.run(linear_recipe, tmp_path / "out", device="cpu", on_progress=seen.append)
    assert [p.done for p in seen] == list(range(1, n_ops + 1))
    assert all(p.total == n_ops and p.bytes_total == out_bytes for p in seen)
    assert [p.message for p in seen] == names
    assert all(a.bytes_done < b.bytes_done for a, b in zip(seen, seen[1:]))
    assert seen[-1].bytes_done == out_bytes and seen[-1].fraction == 1.0
    assert result.tensors == n_ops and result.bytes_written == out_bytes
    assert result.files == ["model.safetensors"] and result.device == "cpu"
    assert result.output == tmp_path / "out"
    # The formula, independently.
    a, b = read_state_dict(llama_family["a"]), read_state_dict(llama_family["b"])
    out = read_state_dict(tmp_path / "out")
    assert set(out) == set(a)
    for name, t in out.items():
        torch.testing.assert_close(t, 0.3 * a[name] + 0.7 * b[name], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- cancel / clean-up


def test_closing_the_generator_removes_the_partial_output(linear_recipe, tmp_path):
    plan = merge.check(linear_recipe)
    output = tmp_path / "out"
    try:
        work = iter_merge(plan, output, device="cpu")
        next(work)
        next(work)
        assert len(leftovers(output)) == 1  # work in progress lives in a hidden folder
        assert not output.exists()
        work.close()
    finally:
        plan.close()
    assert leftovers(output) == [] and not output.exists()


def test_cancel_token_set_before_start_writes_nothing(linear_recipe, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        merge.run(linear_recipe, tmp_path / "out", device="cpu", cancel=token)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_an_error_in_the_progress_callback_cleans_up_at_once(linear_recipe, tmp_path):
    """The callback's exception must close the merge there and then, not when the generator is collected."""
    output = tmp_path / "out"

    def broken(p):
        if p.done == 2:
            raise RuntimeError("the GUI callback broke")

    with pytest.raises(RuntimeError, match="GUI callback") as info:
        merge.run(linear_recipe, output, device="cpu", on_progress=broken)
    assert info.value is not None  # the traceback (and its frames) is still alive here
    assert leftovers(output) == [] and not output.exists()


def test_drive_closes_the_generator_on_errors():
    closed = []

    def work():
        try:
            for i in range(10):
                yield Progress(i + 1, 10)
        finally:
            closed.append(True)
        return "done"

    def boom(p):
        raise ValueError("boom")

    gen = work()
    with pytest.raises(ValueError):
        drive(gen, boom)
    assert closed == [True]
    assert drive(work()) == "done"


def test_a_kernel_error_removes_the_partial_output(linear_recipe, tmp_path, monkeypatch):
    import core.merge.executor as executor

    calls = {"n": 0}
    real = executor._compute

    def flaky(plan, op, inputs, seed):
        calls["n"] += 1
        if calls["n"] == 4:
            raise MergeStudioError(f"Tensor '{op.out_name}': simulated failure.")
        return real(plan, op, inputs, seed)

    monkeypatch.setattr(executor, "_compute", flaky)
    with pytest.raises(MergeStudioError, match="simulated failure"):
        merge.run(linear_recipe, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# ----------------------------------------------------------------------------- options


def test_shard_size_must_be_positive(linear_recipe, tmp_path):
    plan = merge.check(linear_recipe)
    try:
        with pytest.raises(MergeStudioError, match="shard-size"):
            next(iter_merge(plan, tmp_path / "out", device="cpu", shard_size=0))
    finally:
        plan.close()
    assert not (tmp_path / "out").exists()


def test_unknown_device(linear_recipe, tmp_path):
    with pytest.raises(MergeStudioError, match="--device tpu"):
        merge.run(linear_recipe, tmp_path / "out", device="tpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu(linear_recipe, tmp_path):
    with pytest.raises(MergeStudioError, match="no CUDA GPU"):
        merge.run(linear_recipe, tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def test_output_parent_missing(linear_recipe, tmp_path):
    output = tmp_path / "missing" / "out"
    with pytest.raises(MergeStudioError, match="parent folder does not exist") as info:
        merge.run(linear_recipe, output, device="cpu")
    assert str(output.parent) in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_out_dtype_bfloat16(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, {**linear(llama_family["a"], llama_family["b"]), "out_dtype": "bfloat16"})
    merge.run(recipe, tmp_path / "out", device="cpu")
    out = read_state_dict(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    config = yaml.safe_load((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_run_does_not_change_the_recipe(llama_family, tmp_path):
    recipe = merge.load_recipe(write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"])))
    before = recipe.to_dict()
    merge.run(recipe, tmp_path / "out", device="cpu")
    assert recipe.to_dict() == before
    assert "layer_range" not in recipe.to_yaml()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert yaml.safe_load(f.metadata()["mergestudio_recipe"]) == before


# ----------------------------------------------------------------------------- reproducibility


def _dare_ties(family, tmp_path) -> Path:
    return write_recipe(
        tmp_path,
        {
            "merge_method": "dare_ties",
            "base_model": str(family["base"]),
            "models": [
                {"model": str(family["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(family["b"]), "parameters": {"weight": 0.4, "density": [0.3, 0.8]}},
            ],
        },
        "dare.yaml",
    )


def test_dare_ties_is_reproducible_across_thread_counts(llama_family, tmp_path):
    recipe = _dare_ties(llama_family, tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        merge.run(recipe, tmp_path / "one", device="cpu", seed=7)
        torch.set_num_threads(2)
        merge.run(recipe, tmp_path / "two", device="cpu", seed=7)
        merge.run(recipe, tmp_path / "other", device="cpu", seed=8)
    finally:
        torch.set_num_threads(threads)
    one, two, other = (digest(tmp_path / n) for n in ("one", "two", "other"))
    assert one == two
    assert one != other
    a, c = read_state_dict(tmp_path / "one"), read_state_dict(tmp_path / "other")
    differing = [n for n in a if not torch.equal(a[n], c[n])]
    assert len(differing) > len(a) // 2, "a different seed should change most tensors"
