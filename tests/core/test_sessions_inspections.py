"""Compare and Inspect results in the session store: records, JSON checks, files, revision 0004."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.sessions import InspectionRecord, SessionStore, StoreError


@pytest.fixture
def db(fresh_home) -> Path:
    return fresh_home / "sessions.db"


@pytest.fixture
def store(db):
    s = SessionStore.open(db)
    yield s
    s.close()


def test_an_inspection_round_trips_and_survives_reopening(store, db):
    sid = store.create_session("compare").id
    folder = store.inspection_dir(sid)
    image = folder / "pane-0.png"
    image.write_bytes(b"png")
    rec = store.add_inspection(
        sid, kind="compare-image", models=["/m/a", Path("/m/b")],
        settings={"prompt": "a cat", "seed": 3, "steps": 4},
        results={"panes": [{"label": "A", "seconds": 1.5}, {"label": "B", "error": "no vae/"}]},
        files=[image], status="partial", label="  first  ",
    )
    assert isinstance(rec, InspectionRecord)
    assert rec.models == ["/m/a", "/m/b"] and rec.label == "first" and rec.status == "partial"
    store.close()
    again = SessionStore.open(db)
    try:
        (back,) = again.list_inspections(sid)
        assert back == rec
        assert back.settings["seed"] == 3 and back.results["panes"][1]["error"] == "no vae/"
        assert again.list_inspections(sid, kind="tokens") == []
        assert again.get_inspection(rec.id) == rec
    finally:
        again.close()


def test_newest_first_and_filtered_by_kind(store):
    sid = store.create_session("s").id
    a = store.add_inspection(sid, kind="tokens", models=["/m/a"], settings={}, results={"count": 3})
    b = store.add_inspection(sid, kind="weights", models=["/m/a", "/m/b"], settings={}, results={})
    assert [r.id for r in store.list_inspections(sid)] == [b.id, a.id]
    assert [r.id for r in store.list_inspections(sid, kind="tokens")] == [a.id]


@pytest.mark.parametrize("bad, words", [
    (dict(kind="nonsense"), ["kind", "compare-text"]),
    (dict(status="maybe"), ["status", "partial"]),
    (dict(models="/m/a"), ["models"]),
    (dict(settings={"x": float("nan")}), ["settings", "NaN"]),
    (dict(results=[1, 2]), ["results", "JSON object"]),
    (dict(files=[""]), ["File 0"]),
])
def test_bad_values_are_refused_with_a_sentence(store, bad, words):
    sid = store.create_session("s").id
    args = dict(kind="tokens", models=["/m/a"], settings={}, results={}, files=[], status="done")
    args.update(bad)
    with pytest.raises(StoreError) as info:
        store.add_inspection(sid, **args)
    text = str(info.value)
    assert "\n" not in text and all(w in text for w in words), text
    assert store.list_inspections(sid) == []


def test_delete_removes_its_files_only_inside_the_session_folder(store, tmp_path):
    sid = store.create_session("s").id
    mine = store.inspection_dir(sid) / "maps.npz"
    mine.write_bytes(b"x")
    outside = tmp_path / "user-export.png"
    outside.write_bytes(b"y")
    rec = store.add_inspection(sid, kind="attention", models=["/m/a"], settings={}, results={},
                               files=[mine, outside])
    store.delete_inspection(rec.id)
    assert not mine.exists() and outside.exists()
    with pytest.raises(StoreError, match="Inspection"):
        store.get_inspection(rec.id)


def test_deleting_the_session_removes_its_inspections_and_folder(store, db):
    sid = store.create_session("s").id
    folder = store.inspection_dir(sid)
    (folder / "a.png").write_bytes(b"x")
    store.add_inspection(sid, kind="compare-text", models=["/m/a", "/m/b"], settings={}, results={})
    store.delete_session(sid)
    assert not folder.exists()
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT COUNT(*) FROM inspections").fetchone() == (0,)
    finally:
        con.close()


def test_sessions_show_lists_inspections(store, capsys):
    from core.cli import main

    sid = store.create_session("look").id
    store.add_inspection(sid, kind="weights", models=["/m/alpha", "/m/beta"], settings={}, results={},
                         label="diff")
    store.close()
    assert main(["sessions", "show", str(sid)]) == 0
    out = capsys.readouterr().out
    assert "Compare and inspect (1, newest first):" in out
    assert "weights" in out and "alpha, beta" in out and '"diff"' in out
    assert main(["sessions", "show", str(sid), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["inspections"][0]["kind"] == "weights"
