"""``mergestudio sessions list|show`` end to end, on a database filled through the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from core.sessions import INTERRUPTED_ERROR, SessionStore

REPO = Path(__file__).resolve().parents[2]
RECIPE = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {density: 0.5, weight: 1}\n"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def filled(fresh_home) -> dict:
    """Two sessions; the first with models, two recipe versions, three runs and a note."""
    with SessionStore.open() as store:
        blend = store.create_session("Llama blend")
        store.add_model(blend.id, "/models/tiny-a", name="tiny-a", architecture="LlamaForCausalLM",
                        header_hash="0123456789abcdef0123")
        store.add_model(blend.id, "/models/tiny-b", name="tiny-b")
        v1 = store.add_recipe_version(blend.id, RECIPE, method="ties", label="first try")
        v2 = store.add_recipe_version(blend.id, RECIPE.replace("0.5", "0.3"), method="ties")
        ok = store.start_run(blend.id, RECIPE, "/out/ok", method="ties", settings={"seed": 1}, recipe_version_id=v1.id)
        store.finish_run(ok.id, "succeeded", seconds=12.25, peak_memory_bytes=1_500_000_000)
        bad = store.start_run(blend.id, v2.yaml_text, "/out/bad", method="ties", recipe_version_id=v2.id)
        store.finish_run(bad.id, "failed", error="Tensor model.norm.weight of tiny-b has a NaN.")
        dead = store.start_run(blend.id, v2.yaml_text, "/out/dead", method="ties")  # left running
        store.add_note(blend.id, "density 0.3 is worse\nkeep 0.5")
        empty = store.create_session("Empty one")
    return {"blend": blend.id, "empty": empty.id, "ok": ok.id, "bad": bad.id, "dead": dead.id, "home": fresh_home}


def test_list_prints_sessions_most_recent_first(capsys, filled):
    code, out, err = run_cli(capsys, "sessions", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "Updated", "Runs", "Models", "Name"]
    assert lines[1].split()[0] == str(filled["empty"]) and lines[1].endswith("Empty one")
    assert lines[2].split()[0] == str(filled["blend"]) and lines[2].endswith("Llama blend")
    assert lines[2].split()[3:5] == ["3", "2"]  # runs, models


def test_list_json(capsys, filled):
    code, out, _ = run_cli(capsys, "sessions", "list", "--json")
    assert code == 0
    listing = json.loads(out)
    assert [s["name"] for s in listing] == ["Empty one", "Llama blend"]
    blend = listing[1]
    assert blend["id"] == filled["blend"] and blend["run_count"] == 3 and blend["model_count"] == 2
    assert blend["created_at"].endswith("+00:00")


def test_show_prints_models_versions_runs_and_notes(capsys, filled):
    code, out, err = run_cli(capsys, "sessions", "show", filled["blend"])
    assert code == 0 and err == ""
    assert out.startswith(f"Session {filled['blend']}: Llama blend\n")
    assert "tiny-a  [LlamaForCausalLM]  /models/tiny-a  headers 0123456789ab" in out
    assert "Models (2):" in out and "Recipe versions (2, newest first):" in out
    assert out.index("  v2  ") < out.index("  v1  ") and '"first try"' in out
    runs = [line for line in out.splitlines() if line.startswith("  #")]
    assert [line.split()[0:2] for line in runs] == [
        [f"#{filled['dead']}", "interrupted"],  # no app held the lock: that run's process is gone
        [f"#{filled['bad']}", "failed"],
        [f"#{filled['ok']}", "succeeded"],
    ]
    assert "12.2 s  peak 1.50 GB  -> /out/ok" in out
    assert "Tensor model.norm.weight of tiny-b has a NaN." in out and INTERRUPTED_ERROR in out
    assert "density 0.3 is worse" in out and "keep 0.5" in out


def test_show_json_holds_everything(capsys, filled):
    code, out, _ = run_cli(capsys, "sessions", "show", filled["blend"], "--json")
    assert code == 0
    data = json.loads(out)
    assert data["database"] == str(filled["home"] / "sessions.db")
    assert data["session"]["name"] == "Llama blend"
    assert [m["name"] for m in data["models"]] == ["tiny-a", "tiny-b"]
    assert [v["number"] for v in data["recipe_versions"]] == [2, 1]
    assert data["recipe_versions"][1]["yaml_text"] == RECIPE
    assert {r["id"]: r["status"] for r in data["runs"]} == {
        filled["ok"]: "succeeded", filled["bad"]: "failed", filled["dead"]: "interrupted"
    }
    ok = next(r for r in data["runs"] if r["id"] == filled["ok"])
    assert ok["settings"] == {"seed": 1} and ok["peak_memory_bytes"] == 1_500_000_000 and ok["seconds"] == 12.25
    assert [n["text"] for n in data["notes"]] == ["density 0.3 is worse\nkeep 0.5"]
    assert data["workspace"] is None


def test_show_a_missing_session_is_one_line_and_status_1(capsys, filled):
    code, out, err = run_cli(capsys, "sessions", "show", 999)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Session 999 does not exist" in err and "sessions.db" in err


def test_usage_errors_are_status_2(capsys, fresh_home):
    for args in (("sessions", "show", "abc"), ("sessions",), ("sessions", "drop")):
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_no_database_yet_is_not_created(capsys, fresh_home):
    code, out, _ = run_cli(capsys, "sessions", "list")
    assert code == 0 and out.startswith("No sessions yet")
    code, out, _ = run_cli(capsys, "sessions", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, _, err = run_cli(capsys, "sessions", "show", 1)
    assert code == 1 and "no sessions database" in err
    assert not (fresh_home / "sessions.db").exists()


def test_list_works_while_the_app_holds_the_database(capsys, fresh_home):
    with SessionStore.open() as app_store:  # as the running app would
        sid = app_store.create_session("open in the app").id
        running = app_store.start_run(sid, RECIPE, "/out/now")
        code, out, err = run_cli(capsys, "sessions", "show", sid, "--json")
        assert code == 0, err
        assert [r["status"] for r in json.loads(out)["runs"]] == ["running"]  # the app's own run: untouched
        code, out, _ = run_cli(capsys, "sessions", "list")
        assert code == 0 and "open in the app" in out
        assert app_store.get_run(running.id).status == "running"


def test_a_corrupt_database_is_reported_and_left_alone(capsys, fresh_home):
    db = fresh_home / "sessions.db"
    db.write_bytes(b"not sqlite\n" * 50)
    code, out, err = run_cli(capsys, "sessions", "list")
    assert code == 1 and out == "" and err.count("\n") == 1 and str(db) in err
    assert db.read_bytes() == b"not sqlite\n" * 50


def test_the_real_command_line(filled):
    env = {**os.environ, "MERGESTUDIO_HOME": str(filled["home"])}
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "sessions", "list", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [s["name"] for s in json.loads(result.stdout)] == ["Empty one", "Llama blend"]
