"""Merges in a child process (core.merge.child) and ``merge --progress-jsonl``.

Each ChildMerge starts a Python that imports torch (about a second or two),
so every test here starts as few children as it can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

import core.merge as merge
from core.cli import main
from core.errors import CancelledError, MergeStudioError
from core.jobs import CancelToken, Progress, drive
from core.merge.child import ChildMerge, ChildResult, _JsonLines
from core.paths import cache_dir
from tests.fixtures.tiny_models import read_state_dict

REPO = Path(__file__).resolve().parents[2]


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipes(family: dict[str, Path]) -> dict[str, dict]:
    a, b, base = (str(family[k]) for k in ("a", "b", "base"))
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}],
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.4, "density": [0.3, 0.8]}},
            ],
            "parameters": {"normalize": True},
        },
        "dare_ties": {  # random: the seed must reach the child
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.7}},
            ],
        },
    }


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.partial-"))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temp_recipes() -> list[Path]:
    return sorted(cache_dir().glob("child-recipe-*"))


def pid_gone(pid: int) -> bool:
    """True when ``pid`` is no process of ours any more (reaped: not even a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def check_monotonic(seen: list[Progress]) -> None:
    assert seen, "no progress came"
    assert all(b.done > a.done and b.bytes_done > a.bytes_done for a, b in zip(seen, seen[1:]))
    assert all(p.total == seen[0].total for p in seen)
    assert seen[-1].done == seen[-1].total and seen[-1].fraction == 1.0


# ----------------------------------------------------------------------------- the good path


@pytest.mark.parametrize("method,seed,shard", [("linear", 0, None), ("ties", 0, 200_000), ("dare_ties", 7, None)])
def test_child_output_is_byte_identical_to_an_in_process_merge(llama_family, tmp_path, method, seed, shard):
    recipe = write_recipe(tmp_path, recipes(llama_family)[method])
    merge.run(recipe, tmp_path / "inproc", device="cpu", seed=seed, shard_size=shard)

    child = ChildMerge(recipe, tmp_path / "child", device="cpu", seed=seed, shard_size=shard)
    seen: list[Progress] = []
    result = drive(child.run(), seen.append)

    assert isinstance(result, ChildResult)
    assert files_of(tmp_path / "child") == files_of(tmp_path / "inproc")
    assert "README.md" in files_of(tmp_path / "child")
    check_monotonic(seen)
    assert result.tensors == seen[-1].total and result.bytes_written == seen[-1].bytes_total
    assert result.output == tmp_path / "child" and result.device == "cpu"
    if shard is None:
        assert result.files == ["model.safetensors"]
    else:  # the shard size travelled too
        assert len(result.files) > 1 and (tmp_path / "child" / "model.safetensors.index.json").is_file()
    assert result.peak_rss_bytes > 0 and child.rss_bytes is not None and child.rss_bytes > 0
    assert pid_gone(child.pid) and temp_recipes() == []
    if method == "dare_ties":  # another seed gives another model: the seed did travel
        merge.run(recipe, tmp_path / "other", device="cpu", seed=seed + 1)
        assert files_of(tmp_path / "other")["model.safetensors"] != files_of(tmp_path / "child")["model.safetensors"]


def test_a_recipe_object_with_relative_refs_runs_anywhere_without_card(llama_family, tmp_path, monkeypatch):
    """Refs relative to the recipe's folder are made absolute; the child needs no cwd in the repo."""
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    data = recipes(llama_family)["linear"]
    for entry in data["models"]:
        entry["model"] = os.path.relpath(entry["model"], recipe_dir)
    path = write_recipe(recipe_dir, data)
    elsewhere = tmp_path / "elsewhere" / "deeper" / "still"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # neither the repo root nor the recipe's folder
    assert not Path(data["models"][0]["model"]).exists()

    merge.run(path, tmp_path / "inproc", device="cpu")
    out = tmp_path / "child"
    drive(ChildMerge(merge.load_recipe(path), out, device="cpu", model_card=False).run())

    assert not (out / "README.md").exists()
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [m["model"] for m in saved["models"]] == [str(llama_family["a"]), str(llama_family["b"])]
    inproc, child = read_state_dict(tmp_path / "inproc"), read_state_dict(out)
    assert set(inproc) == set(child) and all(inproc[n].equal(child[n]) for n in inproc)
    assert temp_recipes() == []


# ----------------------------------------------------------------------------- errors


def test_a_bad_recipe_raises_the_sentence_the_cli_prints(llama_family, tmp_path, capsys):
    data = recipes(llama_family)["linear"]
    data["models"][1]["model"] = str(tmp_path / "no-such-model")
    recipe = write_recipe(tmp_path, data)
    assert main(["merge", str(recipe), "-o", str(tmp_path / "cli")]) == 1
    cli_line = capsys.readouterr().err.strip()

    child = ChildMerge(recipe, tmp_path / "out", device="cpu")
    with pytest.raises(MergeStudioError) as caught:
        drive(child.run())
    assert not isinstance(caught.value, CancelledError)
    assert cli_line == f"mergestudio: error: {caught.value}"
    assert "no-such-model" in str(caught.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
    assert pid_gone(child.pid) and temp_recipes() == []


def test_bad_options_fail_before_any_process_starts(tmp_path):
    with pytest.raises(MergeStudioError, match="--tensor-delay"):
        ChildMerge(tmp_path / "r.yaml", tmp_path / "out", tensor_delay_s=-1)
    with pytest.raises(MergeStudioError, match="--shard-size"):
        ChildMerge(tmp_path / "r.yaml", tmp_path / "out", shard_size=0)


def test_in_process_merge_refuses_a_negative_delay(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, recipes(llama_family)["linear"])
    with pytest.raises(MergeStudioError, match=r"--tensor-delay must be .* got -0.5"):
        merge.run(recipe, tmp_path / "out", device="cpu", tensor_delay_s=-0.5)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_a_child_that_exits_without_a_word_is_one_sentence(llama_family, tmp_path):
    """An interpreter that fails at once (here /bin/false): status named, nothing left."""
    false = "/bin/false"
    if not os.access(false, os.X_OK):
        pytest.skip("no /bin/false here")
    recipe = write_recipe(tmp_path, recipes(llama_family)["linear"])
    child = ChildMerge(recipe, tmp_path / "out", python=false)
    with pytest.raises(MergeStudioError) as caught:
        drive(child.run())
    message = str(caught.value)
    assert message == (
        f"The merge process exited with status 1 without reporting a result; nothing was written to {tmp_path / 'out'}."
    )
    assert pid_gone(child.pid) and temp_recipes() == []


# ----------------------------------------------------------------------------- stopping


def _slow(llama_family, tmp_path, **options) -> tuple[ChildMerge, Path]:
    recipe = write_recipe(tmp_path, recipes(llama_family)["linear"])
    out = tmp_path / "out"
    return ChildMerge(recipe, out, device="cpu", tensor_delay_s=0.1, **options), out


def test_cancel_from_another_thread_stops_between_tensors(llama_family, tmp_path):
    child, out = _slow(llama_family, tmp_path)
    seen: list[Progress] = []
    work = child.run()
    with pytest.raises(CancelledError, match="nothing was written"):
        for progress in work:
            seen.append(progress)
            if len(seen) == 1:
                assert leftovers(out), "the child should be writing its partial folder"
                threading.Thread(target=child.cancel).start()
    assert seen[-1].done < seen[-1].total, "it should stop mid-merge"
    assert not out.exists() and leftovers(out) == []
    assert pid_gone(child.pid) and temp_recipes() == []
    child.cancel()  # after the end: harmless


def test_sigkill_is_the_out_of_memory_sentence_and_leaves_nothing(llama_family, tmp_path):
    child, out = _slow(llama_family, tmp_path)
    work = child.run()
    first = next(work)
    assert first.done == 1 and leftovers(out)
    os.kill(child.pid, signal.SIGKILL)  # what the kernel's OOM killer does
    with pytest.raises(MergeStudioError) as caught:
        for _ in work:
            pass
    assert str(caught.value) == (
        f"The merge process was killed by signal 9 (SIGKILL), most likely because it ran out of memory; "
        f"nothing was written to {out}."
    )
    assert not out.exists() and leftovers(out) == []
    assert pid_gone(child.pid) and temp_recipes() == []


def test_kill_stops_hard_and_reads_as_cancelled(llama_family, tmp_path):
    child, out = _slow(llama_family, tmp_path)
    work = child.run()
    next(work)
    child.kill()
    with pytest.raises(CancelledError, match="stopped"):
        for _ in work:
            pass
    assert not out.exists() and leftovers(out) == []
    assert pid_gone(child.pid)


def test_closing_the_generator_cancels_and_reaps_the_child(llama_family, tmp_path):
    child, out = _slow(llama_family, tmp_path)
    work = child.run()
    next(work)
    pid = child.pid
    work.close()
    assert pid_gone(pid)
    assert not out.exists() and leftovers(out) == [] and temp_recipes() == []


# ----------------------------------------------------------------------------- the CLI side


def _cli(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "core.cli", "merge", str(recipe), "-o", str(out), "--progress-jsonl", *extra]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env)


def test_progress_jsonl_prints_parseable_lines_ending_in_a_result(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, recipes(llama_family)["linear"])
    out = tmp_path / "out"
    proc = _cli(recipe, out, "--device", "cpu", "--no-card")
    assert proc.stdout is not None and proc.stdin is not None
    lines = proc.stdout.read().splitlines()  # stdin held open: the merge runs to the end
    proc.stdin.close()
    proc.wait()
    events = [json.loads(line) for line in lines]
    progress, result = events[:-1], events[-1]
    assert proc.returncode == 0
    assert all(e["event"] == "progress" for e in progress)
    assert set(progress[0]) == {
        "event", "done", "total", "bytes_done", "bytes_total", "elapsed_s", "eta_s", "message", "rss_bytes",
    }
    assert progress[0]["done"] == 1 and progress[-1]["done"] == progress[-1]["total"]
    assert result["event"] == "result" and result["output"] == str(out) and result["peak_rss_bytes"] > 0
    assert set(result) == {"event", "output", "tensors", "bytes", "seconds", "device", "files", "peak_rss_bytes"}
    assert result["tensors"] == progress[-1]["total"] and result["files"] == ["model.safetensors"]
    assert (out / "model.safetensors").is_file() and not (out / "README.md").exists()
    assert (out / "mergekit_config.yml").is_file()


def test_closing_stdin_mid_merge_stops_the_child_and_cleans_up(llama_family, tmp_path):
    recipe = write_recipe(tmp_path, recipes(llama_family)["linear"])
    out = tmp_path / "out"
    proc = _cli(recipe, out, "--device", "cpu", "--tensor-delay", "0.1")
    assert proc.stdout is not None and proc.stdin is not None
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "progress" and first["done"] == 1 and leftovers(out)
    proc.stdin.close()  # the parent went away
    rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
    proc.wait()
    assert rest[-1] == {"event": "error", "kind": "cancelled", "message": "Cancelled by the user; nothing was written."}
    assert all(e["done"] < e["total"] for e in rest[:-1])
    assert proc.returncode == 130 and not out.exists() and leftovers(out) == []


def test_progress_lines_are_throttled_but_keep_the_first_and_the_last(monkeypatch):
    """A fake clock: 100 events in 0.1 s give the first, one per 0.05 s, and the last."""
    import core.merge.child as child_module

    class Lines:
        def __init__(self) -> None:
            self.lines: list[dict] = []

        def write(self, text: str) -> None:
            self.lines.append(json.loads(text))

        def flush(self) -> None:
            pass

    clock = iter(i * 0.001 for i in range(1000))
    monkeypatch.setattr(child_module.time, "monotonic", lambda: next(clock))
    stream = Lines()
    emitter = _JsonLines(stream, CancelToken())  # type: ignore[arg-type]
    for i in range(1, 101):
        emitter.progress(Progress(i, 100, i, 100, 0.001 * i, f"t{i}"))
    done = [line["done"] for line in stream.lines]
    assert done[0] == 1 and done[-1] == 100
    assert done == [1, 51, 100]
    assert all(line["rss_bytes"] > 0 for line in stream.lines)


def test_a_closed_stdout_cancels_instead_of_crashing():
    class Closed:
        def write(self, text: str) -> None:
            raise BrokenPipeError()

        def flush(self) -> None:
            pass

    token = CancelToken()
    _JsonLines(Closed(), token).progress(Progress(1, 2))  # type: ignore[arg-type]
    assert token.cancelled
