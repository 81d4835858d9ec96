"""``mergestudio models scan`` and ``mergestudio models demo``, end to end.

scan prints one line per model and one per problem and exits 0 even when some
models are broken, 1 (one line on stderr) when a FOLDER does not exist; --json
carries the same facts; --hf-cache adds the local Hugging Face cache. demo
builds the family (or reuses it) and prints its folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from core.demo import DEMO_NAMES


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from core.demo import make_demo_family

    root = tmp_path_factory.mktemp("demo")
    make_demo_family(root)
    return root


@pytest.fixture
def library(tmp_path, demo_root, bad_models) -> Path:
    root = tmp_path / "library"
    shutil.copytree(demo_root, root / "demo")
    shutil.copytree(bad_models.truncated.path, root / "broken")
    return root


def test_scan_lists_models_and_problems(capsys, library, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    code, out, err = run_cli(capsys, "models", "scan", library)
    assert code == 0 and err == ""
    lines = out.splitlines()
    model_lines = [line for line in lines if line.startswith("demo-")]
    assert [line.split()[0] for line in model_lines] == list(DEMO_NAMES)
    for line, name in zip(model_lines, DEMO_NAMES):
        size = (library / "demo" / name / "model.safetensors").stat().st_size
        assert "LlamaForCausalLM" in line and "214K params" in line and "BF16" in line
        assert f"{size / 1e3:.1f} kB" in line and line.endswith(str(library / "demo" / name))
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 1 and "truncated" in problems[0]
    assert str(library / "broken" / "model.safetensors") in problems[0]
    assert lines[-1] == "3 models, 1 problem in 1 folder."


def test_scan_json_and_provenance(capsys, library, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic",
        "base_model": str(library / "demo" / "demo-base"),
        "models": [{"model": str(library / "demo" / n), "parameters": {"weight": 0.5}} for n in DEMO_NAMES[1:]],
    }))
    assert run_cli(capsys, "merge", recipe, "-o", library / "merged", "--device", "cpu")[0] == 0

    code, out, _ = run_cli(capsys, "models", "scan", library, "--json")
    assert code == 0
    result = json.loads(out)
    by_name = {m["name"]: m for m in result["models"]}
    assert set(by_name) == {*DEMO_NAMES, "merged"}
    merged = by_name["merged"]
    assert merged["provenance"]["tool"] == "Merge Studio"
    assert merged["provenance"]["detail"] == "task_arithmetic of 3 models"
    assert by_name["demo-base"]["num_parameters"] == 213568 and by_name["demo-base"]["layer_count"] == 4
    assert [p["path"] for p in result["problems"]] == [str(library / "broken")]
    assert result["summary"]["models"] == 4 and result["summary"]["roots"] == [str(library)]

    code, out, _ = run_cli(capsys, "models", "scan", library)
    merged_line = next(line for line in out.splitlines() if line.startswith("merged "))
    assert "Merge Studio: task_arithmetic of 3 models" in merged_line


def test_scan_with_the_hf_cache(capsys, tmp_path, demo_root, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--demo-org--demo-chat" / "snapshots" / "abc123"
    shutil.copytree(demo_root / "demo-chat", snapshot)
    (hub / "models--demo-org--demo-chat" / "refs").mkdir()
    (hub / "models--demo-org--demo-chat" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    (tmp_path / "empty").mkdir()

    code, out, _ = run_cli(capsys, "models", "scan", tmp_path / "empty")
    assert code == 0 and "demo-org" not in out and out.splitlines()[-1].endswith(f"no models in {tmp_path / 'empty'}.")
    code, out, _ = run_cli(capsys, "models", "scan", tmp_path / "empty", "--hf-cache")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("demo-org/demo-chat "))
    assert line.endswith(str(snapshot))


def test_scan_a_missing_folder_exits_1_with_one_line(capsys, tmp_path, library):
    code, out, err = run_cli(capsys, "models", "scan", library, tmp_path / "nope")
    assert code == 1 and out == ""
    assert err == f"mergestudio: error: {tmp_path / 'nope'}: does not exist.\n"


def test_demo_builds_then_reuses(capsys, tmp_path):
    dest = tmp_path / "demo"
    code, out, err = run_cli(capsys, "models", "demo", dest)
    assert code == 0 and err == ""
    assert out.splitlines() == [str(dest / n) for n in DEMO_NAMES]
    stamp = (dest / "demo-chat" / "model.safetensors").stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "models", "demo", dest, "--json")
    assert code == 0 and json.loads(out) == {"models": [str(dest / n) for n in DEMO_NAMES]}
    assert (dest / "demo-chat" / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_default_destination_and_bad_destination(capsys, fresh_home, tmp_path):
    code, out, _ = run_cli(capsys, "models", "demo")
    assert code == 0 and out.splitlines()[0] == str(fresh_home / "demo-models" / "demo-base")
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(capsys, "models", "demo", tmp_path / "file" / "demo")
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"mergestudio: error: {tmp_path / 'file' / 'demo'}")


def test_the_console_script(library, tmp_path):
    exe = Path(sys.executable).with_name("mergestudio")
    exe = str(exe) if exe.exists() else shutil.which("mergestudio")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "no-cache")}
    proc = subprocess.run([exe, "models", "scan", str(library)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == "3 models, 1 problem in 1 folder."
