"""Every bad input fails early and cleanly.

For each case the CLI must exit non-zero with exactly one line on stderr that
names the file, tensor or field at fault, print no traceback, leave no output
folder (and no hidden ``.NAME.partial-*`` folder beside it), and leave an
existing output untouched even with ``--overwrite``.

Most cases drive ``core.cli.main`` in-process (fast); a couple spawn the real
``mergestudio`` console script to prove the exit status and stderr of the
installed command.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import core.merge as merge
from core.cli import main
from core.errors import CancelledError, MergeStudioError
from core.jobs import CancelToken
from tests.fixtures.tiny_models import read_state_dict

SENTINEL = "sentinel.txt"
SENTINEL_TEXT = "a good model lives here\n"


# ----------------------------------------------------------------------------- helpers


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear(*models: Path | str, weights: tuple[float, ...] | None = None, **extra) -> dict:
    weights = weights or tuple(1.0 for _ in models)
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **extra,
    }


def leftovers(output: Path) -> list[str]:
    """Hidden work folders the atomic writer may have left beside ``output``."""
    parent = output.parent
    if not parent.exists():
        return []
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.name.startswith((f".{output.name}.partial-", f".{output.name}.old-"))
    )


def make_existing_output(output: Path) -> None:
    output.mkdir(parents=True)
    (output / SENTINEL).write_text(SENTINEL_TEXT)
    (output / "model.safetensors").write_bytes(b"the old weights")


def assert_existing_untouched(output: Path) -> None:
    assert sorted(p.name for p in output.iterdir()) == sorted([SENTINEL, "model.safetensors"])
    assert (output / SENTINEL).read_text() == SENTINEL_TEXT
    assert (output / "model.safetensors").read_bytes() == b"the old weights"


def run_cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clear_line(err: str, names: list[str]) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert "Traceback" not in err and "internal error" not in line, line
    assert line.startswith("mergestudio: error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def assert_fails_cleanly(capsys, recipe: Path, tmp_path: Path, names: list[str], extra: tuple = ()) -> str:
    """Run ``merge`` twice: into a fresh path, and over an existing output with --overwrite."""
    fresh = tmp_path / "out-fresh"
    code, out, err = run_cli(capsys, "merge", recipe, "-o", fresh, *extra)
    assert code != 0
    line = assert_one_clear_line(err, names)
    assert not fresh.exists(), "a failed merge created its output folder"
    assert leftovers(fresh) == []

    existing = tmp_path / "out-existing"
    make_existing_output(existing)
    code, out, err = run_cli(capsys, "merge", recipe, "-o", existing, "--overwrite", *extra)
    assert code != 0
    assert_one_clear_line(err, names)
    assert_existing_untouched(existing)
    assert leftovers(existing) == []
    return line


# ----------------------------------------------------------------------------- the table

Case = Callable[[dict, dict, Path], tuple[dict | str, list[str]]]


def _missing_path(fam, bad, tmp):
    missing = tmp / "no-such-model"
    return linear(missing, fam["a"]), [str(missing)]


def _not_a_model(fam, bad, tmp):
    return linear(bad.not_a_model.path, fam["a"]), [str(bad.not_a_model.path), "not a model"]


def _corrupt_json(fam, bad, tmp):
    return linear(fam["a"], bad.corrupt_header.path), [str(bad.corrupt_header.file), "corrupt"]


def _corrupt_length(fam, bad, tmp):
    return linear(fam["a"], bad.corrupt_header_length.path), [str(bad.corrupt_header_length.file), "corrupt"]


def _truncated(fam, bad, tmp):
    t = bad.truncated
    return linear(fam["a"], t.path), [str(t.file), f"'{t.tensor}'", "truncated"]


def _shape_mismatch(fam, bad, tmp):
    s = bad.shape_mismatch
    return linear(fam["a"], s.path), [f"'{s.tensor}'", str(s.path), str(fam["a"]), "shape"]


def _missing_tensor_second(fam, bad, tmp):
    m = bad.missing_tensor
    return linear(fam["a"], m.path), [f"'{m.tensor}'", str(m.path), "missing"]


def _missing_tensor_first(fam, bad, tmp):
    m = bad.missing_tensor
    return linear(m.path, fam["a"]), [f"'{m.tensor}'", str(m.path), "missing"]


def _different_layers(fam, bad, tmp):
    d = bad.different_layers
    return linear(d.path, fam["a"]), [str(d.path), str(fam["a"]), "has 6", "has 4", "layer"]


def _unknown_method(fam, bad, tmp):
    return {**linear(fam["a"], fam["b"]), "merge_method": "tie"}, ["'tie'", "'ties'"]


def _unknown_parameter(fam, bad, tmp):
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0, "densty": 0.5}}],
    }
    return recipe, ["'densty'", "'density'"]


def _density(value):
    def case(fam, bad, tmp):
        recipe = {
            "merge_method": "ties",
            "base_model": str(fam["base"]),
            "models": [
                {"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": str(fam["b"]), "parameters": {"weight": 1.0, "density": value}},
            ],
        }
        return recipe, ["'density'", str(value), "(0, 1]", str(fam["b"])]

    return case


def _zero_weights_linear(fam, bad, tmp):
    return linear(fam["a"], fam["b"], weights=(0.5, -0.5)), ["sum to zero", "normalize", "model.embed_tokens.weight"]


def _zero_weights_ties(fam, bad, tmp):
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(fam["b"]), "parameters": {"weight": -1.0, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
    }
    return recipe, ["sum to zero", "normalize"]


def _ties_without_base(fam, bad, tmp):
    recipe = {
        "merge_method": "ties",
        "models": [
            {"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(fam["b"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
    }
    return recipe, ["'ties'", "base_model"]


def _slerp_three(fam, bad, tmp):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam[k])} for k in ("base", "a", "b")],
        "parameters": {"t": 0.5},
    }
    return recipe, ["'slerp'", "exactly 2", "gives 3"]


def _slerp_one(fam, bad, tmp):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["base"])}],
        "parameters": {"t": 0.5},
    }
    return recipe, ["'slerp'", "exactly 2", "gives 1"]


def _pickle_only(fam, bad, tmp):
    p = bad.pickle_only
    return linear(fam["a"], p.path), [str(p.file), "pickle", "--allow-pickle"]


def _nan(fam, bad, tmp):
    n = bad.nan
    return linear(fam["a"], n.path), [str(n.path), f"'{n.tensor}'", "NaN"]


def _union(fam, bad, tmp):
    return linear(fam["a"], fam["b"], tokenizer_source="union"), ["union", "not supported yet"]


def _invalid_yaml(fam, bad, tmp):
    return f"merge_method: linear\nmodels: [\n  - {{model: {fam['a']}\n", ["recipe.yaml", "YAML", "line"]


def _models_and_slices(fam, bad, tmp):
    recipe = linear(fam["a"], fam["b"])
    recipe["slices"] = [{"sources": [{"model": str(fam["a"]), "layer_range": [0, 4]}]}]
    return recipe, ["recipe.yaml", "'models:'", "'slices:'"]


def _layer_range_outside(fam, bad, tmp):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(fam["a"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fam["b"]), "layer_range": [2, 9]}]},
        ],
    }
    return recipe, ["slices[1]", "layer_range", str(fam["b"]), "4 layers"]


def _infinite_weight(fam, bad, tmp):
    return linear(fam["a"], fam["b"], weights=(float("inf"), 1.0)), ["weight", "finite"]


def _simple(recipe_of, names_of):
    def case(fam, bad, tmp):
        return recipe_of(fam), names_of(fam)

    return case


def _two_sources(a_range, b_range, method="linear", with_base=False, params=None):
    """A one-slice recipe over models a and b (optionally naming the family's base, which is not a source)."""

    def recipe(fam):
        p = {"weight": 1.0, **(params or {})}
        out = {
            "merge_method": method,
            "slices": [
                {
                    "sources": [
                        {"model": str(fam["a"]), "layer_range": a_range, "parameters": p},
                        {"model": str(fam["b"]), "layer_range": b_range, "parameters": p},
                    ]
                }
            ],
        }
        if with_base:
            out["base_model"] = str(fam["base"])
        return out

    return recipe


CASES: dict[str, Case] = {
    "path_does_not_exist": _missing_path,
    "folder_not_a_model": _not_a_model,
    "corrupt_header_json": _corrupt_json,
    "corrupt_header_length": _corrupt_length,
    "truncated_file": _truncated,
    "shape_mismatch": _shape_mismatch,
    "missing_tensor_second": _missing_tensor_second,
    "missing_tensor_first": _missing_tensor_first,
    "different_layer_counts": _different_layers,
    "unknown_method": _unknown_method,
    "unknown_parameter": _unknown_parameter,
    "density_zero": _density(0),
    "density_above_one": _density(1.5),
    "zero_weights_linear": _zero_weights_linear,
    "zero_weights_ties": _zero_weights_ties,
    "ties_without_base": _ties_without_base,
    "slerp_three_models": _slerp_three,
    "slerp_one_model": _slerp_one,
    "pickle_without_opt_in": _pickle_only,
    "nan_or_inf": _nan,
    "tokenizer_union": _union,
    "invalid_yaml": _invalid_yaml,
    "models_and_slices": _models_and_slices,
    "layer_range_outside": _layer_range_outside,
    "infinite_weight": _infinite_weight,
    "tokenizer_base_without_base_model": _simple(
        lambda f: linear(f["a"], f["b"], tokenizer_source="base"), lambda f: ["tokenizer_source", "base_model"]
    ),
    "tokenizer_surgery": _simple(
        lambda f: linear(f["a"], f["b"], tokenizer={"source": "base"}), lambda f: ["'tokenizer:'", "not supported yet"]
    ),
    "unknown_dtype": _simple(lambda f: linear(f["a"], f["b"], dtype="float8"), lambda f: ["dtype", "'float8'"]),
    "bad_chat_template": _simple(
        lambda f: linear(f["a"], f["b"], chat_template="llama3"), lambda f: ["chat_template", "'llama3'"]
    ),
    "slice_sources_of_different_lengths": _simple(
        _two_sources([0, 2], [0, 3]), lambda f: ["slices[0]", "same number of layers", "[2, 3]"]
    ),
    "slice_base_not_a_source": _simple(
        _two_sources([0, 2], [0, 2], method="ties", with_base=True, params={"density": 0.5}),
        lambda f: ["slices[0]", str(f["base"]), "not among"],
    ),
    "model_listed_twice": _simple(lambda f: linear(f["a"], f["a"]), lambda f: ["listed twice"]),
    "missing_required_parameter": _simple(
        lambda f: {"merge_method": "linear", "models": [{"model": str(f["a"])}, {"model": str(f["b"]), "parameters": {"weight": 1}}]},
        lambda f: [str(f["a"]), "'weight'", "required"],
    ),
    "parameter_of_the_wrong_type": _simple(
        lambda f: linear(f["a"], f["b"], weights=("heavy", 1.0)), lambda f: [str(f["a"]), "'weight'", "'heavy'"]
    ),
    "nan_parameter": _simple(
        lambda f: {**linear(f["a"], f["b"]), "parameters": {"normalize": True}, "models": [
            {"model": str(f["a"]), "parameters": {"weight": float("nan")}},
            {"model": str(f["b"]), "parameters": {"weight": 1.0}},
        ]},
        lambda f: [str(f["a"]), "'weight'", "finite"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(case, llama_family, bad_models, tmp_path, capsys):
    recipe, names = CASES[case](llama_family, bad_models, tmp_path)
    path = write_recipe(tmp_path, recipe)
    names = [n.replace("recipe.yaml", str(path)) if n == "recipe.yaml" else n for n in names]
    assert_fails_cleanly(capsys, path, tmp_path, names)


@pytest.mark.parametrize("case", ["corrupt_header_json", "shape_mismatch", "unknown_parameter", "nan_or_inf"])
def test_check_reports_the_same_problem(case, llama_family, bad_models, tmp_path, capsys):
    """``check`` finds header-level problems too (NaN needs the data: check passes it)."""
    recipe, names = CASES[case](llama_family, bad_models, tmp_path)
    path = write_recipe(tmp_path, recipe)
    code, out, err = run_cli(capsys, "check", path)
    if case == "nan_or_inf":
        assert code == 0 and err == ""
        return
    assert code == 1 and out == ""
    assert_one_clear_line(err, names)


def test_unknown_method_lists_nothing_else_when_nothing_is_close(llama_family, tmp_path, capsys):
    path = write_recipe(tmp_path, {**linear(llama_family["a"]), "merge_method": "zzzzqqq"})
    code, _, err = run_cli(capsys, "check", path)
    line = assert_one_clear_line(err, ["'zzzzqqq'", "mergestudio methods"])
    assert code == 1 and "Did you mean" not in line


def test_pickle_with_opt_in_merges_like_safetensors(llama_family, bad_models, tmp_path, capsys):
    pickled = write_recipe(tmp_path, linear(bad_models.pickle_only.path, llama_family["b"], weights=(0.3, 0.7)), "p.yaml")
    code, _, err = run_cli(capsys, "merge", pickled, "-o", tmp_path / "from-pickle", "--allow-pickle")
    assert code == 0, err
    safe = write_recipe(tmp_path, linear(llama_family["base"], llama_family["b"], weights=(0.3, 0.7)), "s.yaml")
    code, _, err = run_cli(capsys, "merge", safe, "-o", tmp_path / "from-safetensors")
    assert code == 0, err
    ours, ref = read_state_dict(tmp_path / "from-pickle"), read_state_dict(tmp_path / "from-safetensors")
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype
        assert torch.equal(ours[name], ref[name]), name


def test_existing_output_without_overwrite(llama_family, tmp_path, capsys):
    output = tmp_path / "merged"
    make_existing_output(output)
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output)
    assert code == 1
    assert_one_clear_line(err, [str(output.absolute()), "not empty", "--overwrite"])
    assert_existing_untouched(output)
    assert leftovers(output) == []


def test_output_is_a_file(llama_family, tmp_path, capsys):
    output = tmp_path / "merged"
    output.write_text("not a folder")
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output, "--overwrite")
    assert code == 1
    assert_one_clear_line(err, [str(output.absolute()), "not a folder"])
    assert output.read_text() == "not a folder"
    assert leftovers(output) == []


def test_infinite_weight_is_refused_by_check(llama_family, tmp_path, capsys):
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"], weights=(float("inf"), 1.0)))
    code, _, err = run_cli(capsys, "check", path)
    assert code == 1
    assert_one_clear_line(err, [str(llama_family["a"]), "'weight'"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["merge", "RECIPE"], ["-o/--output", "required"]),
        (["merge", "RECIPE", "-o", "OUT", "--shard-size", "0"], ["--shard-size", "positive"]),
        (["merge", "RECIPE", "-o", "OUT", "--shard-size", "big"], ["--shard-size", "'big'"]),
        (["merge", "RECIPE", "-o", "OUT", "--seed", "x"], ["--seed"]),
        (["frobnicate"], ["'frobnicate'"]),
    ],
)
def test_usage_errors_are_one_line(args, words, llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    argv = [str(recipe) if a == "RECIPE" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "error:" in err and "--help" in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "out").exists()


def test_recipe_file_missing(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_cli(capsys, "merge", missing, "-o", tmp_path / "out")
    assert code == 1
    assert_one_clear_line(err, [str(missing), "not found"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- disk full


class _FullDisk:
    """A file wrapper whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, handle, budget: list[int]):
        self._handle = handle
        self._budget = budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self._budget[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_disk_full_in_the_middle_of_a_shard(llama_family, tmp_path, capsys, monkeypatch):
    """The file object's write fails partway through the weights: one clear line, nothing left."""
    import builtins

    import core.io.writer as writer_module

    budget = [300_000]  # the output is ~720 kB of float32: fail about 40 % of the way in

    def full_open(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        return _FullDisk(handle, budget) if "w" in mode else handle

    monkeypatch.setattr(writer_module, "open", full_open, raising=False)
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    for output, extra in ((tmp_path / "fresh", ()), (tmp_path / "existing", ("--overwrite",))):
        if extra:
            make_existing_output(output)
        budget[0] = 300_000
        code, _, err = run_cli(capsys, "merge", path, "-o", output, *extra)
        assert code == 1
        line = assert_one_clear_line(err, ["disk is full", "nothing"])
        assert "model.safetensors" in line
        assert leftovers(output) == []
        if extra:
            assert_existing_untouched(output)
        else:
            assert not output.exists()


def test_disk_full_reported_by_the_writer(llama_family, tmp_path, capsys, monkeypatch):
    """ShardedWriter.write raising a bare ENOSPC after a few tensors is still reported as a full disk."""
    from core.io.writer import ShardedWriter

    original = ShardedWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write)
    output = tmp_path / "existing"
    make_existing_output(output)
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output, "--overwrite")
    assert code == 1
    assert_one_clear_line(err, ["disk is full", "nothing"])
    assert_existing_untouched(output)
    assert leftovers(output) == []


def test_disk_full_while_writing_the_extras(llama_family, tmp_path, capsys, monkeypatch):
    """ENOSPC after the weights (config, card, index) is a full disk too, not an internal error."""
    import core.merge.executor as executor

    def full(plan, folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(executor, "_write_extras", full)
    output = tmp_path / "fresh"
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output)
    assert code == 1
    assert_one_clear_line(err, ["disk is full"])
    assert not output.exists() and leftovers(output) == []


def test_not_enough_free_disk_is_refused_before_reading(llama_family, tmp_path, capsys, monkeypatch):
    import core.merge.plan as plan_module

    real = shutil.disk_usage

    def tiny(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(plan_module.shutil, "disk_usage", tiny)
    output = tmp_path / "merged"
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output)
    assert code == 1
    assert_one_clear_line(err, [str(tmp_path), "free disk"])
    assert not output.exists() and leftovers(output) == []


# ----------------------------------------------------------------------------- cancel


def test_cancel_in_the_middle(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    for output, overwrite in ((tmp_path / "fresh", False), (tmp_path / "existing", True)):
        if overwrite:
            make_existing_output(output)
        token = CancelToken()
        seen = []

        def on_progress(p):
            seen.append(p.done)
            if p.done == 3:
                token.cancel()

        with pytest.raises(CancelledError) as info:
            merge.run(recipe, output, device="cpu", overwrite=overwrite, on_progress=on_progress, cancel=token)
        assert "nothing was written" in str(info.value)
        assert seen == [1, 2, 3]
        assert leftovers(output) == []
        if overwrite:
            assert_existing_untouched(output)
        else:
            assert not output.exists()


def test_ctrl_c_in_the_cli(llama_family, tmp_path, capsys, monkeypatch):
    from core.jobs import TerminalProgress

    def interrupt(self, p):
        if p.done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TerminalProgress, "__call__", interrupt)
    output = tmp_path / "existing"
    make_existing_output(output)
    path = write_recipe(tmp_path, linear(llama_family["a"], llama_family["b"]))
    code, _, err = run_cli(capsys, "merge", path, "-o", output, "--overwrite")
    assert code == 130
    assert len(err.splitlines()) == 1 and "cancelled" in err and "Traceback" not in err
    assert_existing_untouched(output)
    assert leftovers(output) == []


# ----------------------------------------------------------------------------- the real command


def _mergestudio() -> str:
    exe = Path(sys.executable).with_name("mergestudio")
    return str(exe) if exe.exists() else (shutil.which("mergestudio") or pytest.skip("mergestudio not installed"))


@pytest.mark.parametrize("case", ["corrupt_header_json", "unknown_method"])
def test_console_script_exit_status_and_stderr(case, llama_family, bad_models, tmp_path):
    recipe, names = CASES[case](llama_family, bad_models, tmp_path)
    path = write_recipe(tmp_path, recipe)
    output = tmp_path / "out"
    make_existing_output(output)
    proc = subprocess.run(
        [_mergestudio(), "merge", str(path), "-o", str(output), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert_one_clear_line(proc.stderr, names)
    assert_existing_untouched(output)
    assert leftovers(output) == []


def test_errors_are_merge_studio_errors(llama_family, bad_models, tmp_path):
    """The Python API raises MergeStudioError (one sentence) for the same inputs."""
    recipe, names = _truncated(llama_family, bad_models, tmp_path)
    with pytest.raises(MergeStudioError) as info:
        merge.check(write_recipe(tmp_path, recipe))
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in names)


def test_tokenizer_source_with_another_vocabulary_is_refused(llama_family, tmp_path, capsys):
    import json
    import shutil

    other = tmp_path / "other-vocab"
    shutil.copytree(llama_family["c"], other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = config["vocab_size"] + 8
    (other / "config.json").write_text(json.dumps(config))
    recipe = linear(llama_family["a"], llama_family["b"], tokenizer_source=str(other))
    path = write_recipe(tmp_path, recipe)
    code, _, err = run_cli(capsys, "merge", path, "-o", tmp_path / "out")
    assert code == 1
    assert "tokenizer_source" in err and "vocabulary" in err and str(other) in err
    assert not (tmp_path / "out").exists()
