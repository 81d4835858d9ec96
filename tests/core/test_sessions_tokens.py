"""Token runs in the session store: records, JSON checks, the views folders, revision 0003, ``sessions show``.

Real SQLite files under a per-test MERGESTUDIO_HOME (so the views folders of one
test never meet another's); migrations driven through Alembic as the store does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from core.cli import main
from core.sessions import SessionStore, StoreError, TokenRunRecord

FIGURES = {"speedup": 1.84, "cosine": 0.98765, "relative_error": 0.0432, "fidelity_metric": "pooled output (CLS)"}


@pytest.fixture
def db(fresh_home) -> Path:
    return fresh_home / "sessions.db"


@pytest.fixture
def store(db):
    s = SessionStore.open(db)
    yield s
    s.close()


def sql(path: Path, query: str, *params) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(query, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def alembic(path: Path, action: str, revision: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine

    from core.sessions.store import alembic_config

    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        getattr(command, action)(alembic_config(conn), revision)
    engine.dispose()


def one_sentence(exc: BaseException, *names: object) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("."), text
    for name in names:
        assert str(name) in text, text
    assert "Traceback" not in text and "sqlalchemy" not in text.lower(), text
    return text


def add(store: SessionStore, sid: int, **changes) -> TokenRunRecord:
    fields = {
        "model_path": "/models/vit-b",
        "model_name": "vit-b",
        "method": "tome",
        "options": {"r": 13},
        "figures": FIGURES,
    }
    return store.add_token_run(sid, **{**fields, **changes})


# ----------------------------------------------------------------------------- records


def test_token_runs_round_trip_newest_first(store):
    sid = store.create_session("tokens").id
    other = store.create_session("other").id
    before = store.get_session(sid).updated_at
    first = add(store, sid, options={"r": (13, -1.0), "prop_attn": False}, label="  decreasing  ")
    second = add(
        store, sid, method="tomesd", model_path=Path("/models/sd15"), model_name="sd15",
        options={"ratio": 0.5}, figures={}, images=[Path("/v/a.png"), "/v/b.png"],
    )  # fmt: skip
    add(store, other)

    assert isinstance(first, TokenRunRecord) and first.session_id == sid
    assert first.options == {"r": [13, -1.0], "prop_attn": False}  # JSON: the pair comes back as a list
    assert first.figures == FIGURES and first.images == [] and first.label == "decreasing"
    assert second.model_path == "/models/sd15" and second.images == ["/v/a.png", "/v/b.png"] and second.label is None
    assert second.created_at > first.created_at > before
    assert [r.id for r in store.list_token_runs(sid)] == [second.id, first.id]
    assert store.get_token_run(first.id) == first
    info = store.get_session(sid)
    assert info.token_run_count == 2 and info.run_count == 0 and info.updated_at == second.created_at
    assert {s.id: s.token_run_count for s in store.list_sessions()} == {sid: 2, other: 1}

    record = store.get_token_run(second.id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.method = "todo"  # type: ignore[misc]
    assert record.options is not store.get_token_run(second.id).options  # a fresh dict each time
    plain = record.to_dict()
    assert plain["created_at"].endswith("+00:00") and json.loads(json.dumps(plain))["images"] == record.images

    store.delete_token_run(first.id)
    assert [r.id for r in store.list_token_runs(sid)] == [second.id]
    with pytest.raises(StoreError) as gone:
        store.get_token_run(first.id)
    one_sentence(gone.value, f"Token run {first.id} does not exist", store.path)
    with pytest.raises(StoreError):
        store.delete_token_run(first.id)
    with pytest.raises(StoreError) as missing:
        store.list_token_runs(999)
    one_sentence(missing.value, "Session 999")


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("options", {"r": {"per": [1, float("nan")]}}, "options['r']['per'][1]"),
        ("options", {"handle": object()}, "options['handle']"),
        ("figures", {"speedup": float("inf")}, "figures['speedup']"),
        ("figures", {"tokens": {3: 17}}, "figures['tokens']"),
        ("figures", {"layers": [1, {2, 3}]}, "figures['layers'][1]"),
        ("figures", ["not", "an", "object"], "figures"),
    ],
)
def test_a_value_json_cannot_hold_is_one_sentence_naming_the_field(store, field, value, named):
    sid = store.create_session("s").id
    before = store.get_session(sid)
    with pytest.raises(StoreError) as bad:
        add(store, sid, **{field: value})
    one_sentence(bad.value, named)
    assert store.list_token_runs(sid) == [] and store.get_session(sid) == before


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"model_path": ""}, "path of its model"),
        ({"model_name": " "}, "display name of the model /models/vit-b"),
        ({"method": ""}, "method of a token run"),
        ({"images": "/v/a.png"}, "list of paths"),
        ({"images": ["/v/a.png", None]}, "Image 1"),
        ({"label": 3}, "label"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(store, changes, named):
    sid = store.create_session("s").id
    with pytest.raises(StoreError) as bad:
        add(store, sid, **changes)
    one_sentence(bad.value, named)
    assert store.list_token_runs(sid) == []


def test_json_changed_behind_the_stores_back_is_one_sentence(store, db):
    sid = store.create_session("s").id
    run = add(store, sid)
    sql(db, "UPDATE token_runs SET figures = '{oops'")
    with pytest.raises(StoreError) as damaged:
        store.get_token_run(run.id)
    one_sentence(damaged.value, f"figures of token run {run.id}", db, "not valid JSON")
    sql(db, "UPDATE token_runs SET figures = '{}', images = '{\"a\": 1}'")
    with pytest.raises(StoreError) as wrong:
        store.list_token_runs(sid)
    one_sentence(wrong.value, f"images of token run {run.id}")
    store.delete_token_run(run.id)  # a damaged run can still be deleted
    assert sql(db, "SELECT COUNT(*) FROM token_runs") == [(0,)]


# ----------------------------------------------------------------------------- views folders


def test_views_folder_per_session_goes_with_the_session(store, fresh_home):
    keep, gone = store.create_session("keep").id, store.create_session("gone").id
    folder = store.token_views_dir(gone)
    assert folder == fresh_home / "token-views" / f"session-{gone}" and folder.is_dir()
    assert store.token_views_dir(gone) == folder  # the same folder again
    (folder / "groups.png").write_bytes(b"png")
    (folder / "layer" / "deep").mkdir(parents=True)
    (folder / "layer" / "deep" / "3.png").write_bytes(b"png")
    add(store, gone, images=[folder / "groups.png"])
    kept = store.token_views_dir(keep)
    (kept / "k.png").write_bytes(b"png")
    add(store, keep, images=[kept / "k.png"])

    store.delete_session(gone)
    assert not folder.exists() and list((fresh_home / "token-views").iterdir()) == [kept]
    assert (kept / "k.png").exists() and [r.session_id for r in store.list_token_runs(keep)] == [keep]
    assert sql(store.path, "SELECT DISTINCT session_id FROM token_runs") == [(keep,)]
    with pytest.raises(StoreError) as missing:
        store.token_views_dir(gone)
    one_sentence(missing.value, f"Session {gone} does not exist")
    assert not folder.exists()


def test_a_failed_delete_keeps_the_session_and_its_views(fresh_home):
    store = SessionStore.open(fresh_home / "sessions.db", busy_timeout=0.05)
    try:
        sid = store.create_session("s").id
        folder = store.token_views_dir(sid)
        (folder / "a.png").write_bytes(b"png")
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
        try:
            with pytest.raises(StoreError) as locked:
                store.delete_session(sid)
            one_sentence(locked.value, "locked")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (folder / "a.png").read_bytes() == b"png" and store.get_session(sid).name == "s"
        assert list(folder.parent.iterdir()) == [folder]  # renamed aside, then back
    finally:
        store.close()


def test_deleting_a_run_removes_only_its_own_images_in_the_views_folder(store, tmp_path):
    sid = store.create_session("s").id
    folder = store.token_views_dir(sid)
    own, shared, outside = folder / "own.png", folder / "shared.png", tmp_path / "elsewhere.png"
    for image in (own, shared, outside):
        image.write_bytes(b"png")
    escaping = folder / ".." / ".." / "elsewhere.png"  # inside by its text only
    run = add(store, sid, images=[own, shared, outside, escaping, folder / "never-written.png"])
    add(store, sid, images=[shared])
    store.delete_token_run(run.id)
    assert not own.exists() and shared.exists() and outside.exists()
    assert [r.images for r in store.list_token_runs(sid)] == [[str(shared)]]


def test_an_in_memory_store_keeps_views_in_a_temporary_folder(fresh_home):
    with SessionStore.in_memory() as memory:
        sid = memory.create_session("m").id
        folder = memory.token_views_dir(sid)
        assert folder.is_dir() and fresh_home not in folder.parents  # never the real sessions' folders
        (folder / "a.png").write_bytes(b"png")
        add(memory, sid, images=[folder / "a.png"])
        assert memory.get_session(sid).token_run_count == 1
    assert not folder.exists() and not (fresh_home / "token-views").exists()


def test_a_read_only_store_lists_token_runs_but_saves_nothing(store, db):
    sid = store.create_session("s").id
    run = add(store, sid)
    with SessionStore.open(db, read_only=True) as reader:
        assert reader.list_token_runs(sid) == [run]
        with pytest.raises(StoreError) as refused:
            reader.token_views_dir(sid)
        one_sentence(refused.value, "read-only")
        with pytest.raises(StoreError):
            add(reader, sid)


def test_a_new_database_sets_views_of_an_earlier_one_aside(fresh_home):
    old = fresh_home / "token-views" / "session-1"
    old.mkdir(parents=True)
    (old / "from-a-lost-database.png").write_bytes(b"png")
    with SessionStore.open(fresh_home / "sessions.db") as store:
        sid = store.create_session("new").id
        assert list(store.token_views_dir(sid).iterdir()) == []
    (aside,) = fresh_home.glob("token-views.old-*")
    assert re.fullmatch(r"token-views\.old-\d{8}-\d{6}", aside.name)
    assert (aside / "session-1" / "from-a-lost-database.png").read_bytes() == b"png"
    with SessionStore.open(fresh_home / "sessions.db") as store:  # an existing database keeps its views
        assert store.token_views_dir(sid).is_dir()
    assert len(list(fresh_home.glob("token-views*"))) == 2


def test_recover_sets_the_views_of_the_damaged_database_aside(fresh_home):
    db = fresh_home / "sessions.db"
    with SessionStore.open(db) as store:
        sid = store.create_session("old").id
        (store.token_views_dir(sid) / "a.png").write_bytes(b"png")
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)  # damaged
    store, kept = SessionStore.recover(db)
    try:
        assert kept.exists() and store.list_sessions() == []
        assert not (fresh_home / "token-views").exists()
        (aside,) = fresh_home.glob("token-views.old-*")
        assert (aside / f"session-{sid}" / "a.png").exists()
    finally:
        store.close()


# ----------------------------------------------------------------------------- revision 0003


def test_a_0002_database_with_rows_is_backed_up_then_upgraded(db):
    from core.sessions import schema

    assert schema.REVISIONS[1:3] == ("0002", "0003")
    alembic(db, "upgrade", "0002")
    con = sqlite3.connect(db)
    con.executescript(
        """
        INSERT INTO sessions (id, name, created_at, updated_at, workspace)
            VALUES (1, 'before tokens', '2025-05-01 10:00:00.000000', '2025-05-02 11:30:00.000000', '{"tab": 1}');
        INSERT INTO session_models (session_id, path, name, architecture, header_hash, added_at, updated_at)
            VALUES (1, '/models/a', 'A', 'llama', 'abc', '2025-05-01 10:00:00.000000', '2025-05-01 10:00:00.000000');
        INSERT INTO merge_runs (id, session_id, recipe_version_id, recipe_yaml, method, status, started_at,
                                finished_at, seconds, output_path, error, settings, peak_memory_bytes)
            VALUES (1, 1, NULL, 'merge_method: ties', 'ties', 'succeeded', '2025-05-01 10:06:00.000000',
                    '2025-05-01 10:07:00.000000', 60.0, '/out/ties', NULL, '{"seed": 3}', 1000);
        INSERT INTO notes (session_id, text, created_at, updated_at)
            VALUES (1, 'kept', '2025-05-01 10:00:00.000000', '2025-05-01 10:00:00.000000');
        """
    )
    con.commit()
    con.close()

    store = SessionStore.open(db)
    try:
        backup = store.backup_path
        assert backup is not None and re.fullmatch(r"sessions\.db\.bak-0002-\d{8}-\d{6}", backup.name)
        assert sql(backup, "SELECT version_num FROM alembic_version") == [("0002",)]
        assert sql(backup, "SELECT name FROM sqlite_master WHERE name = 'token_runs'") == []
        assert sql(db, "SELECT version_num FROM alembic_version") == [(schema.HEAD,)]
        (session,) = store.list_sessions()
        assert (session.name, session.run_count, session.model_count, session.token_run_count) == (
            "before tokens", 1, 1, 0
        )
        assert session.created_at == datetime(2025, 5, 1, 10, 0, tzinfo=timezone.utc)
        assert store.get_run(1).peak_memory_bytes == 1000 and store.get_run(1).settings == {"seed": 3}
        assert store.load_workspace(1) == {"tab": 1} and [n.text for n in store.list_notes(1)] == ["kept"]
        assert store.list_token_runs(1) == []
        run = add(store, 1)
    finally:
        store.close()
    with SessionStore.open(db) as again:
        assert again.backup_path is None and again.list_token_runs(1) == [run]


def test_downgrade_to_0002_drops_only_the_token_runs(db):
    with SessionStore.open(db) as store:
        sid = store.create_session("kept").id
        store.add_note(sid, "note")
        add(store, sid)
    alembic(db, "downgrade", "0002")
    assert sql(db, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert sql(db, "SELECT name FROM sqlite_master WHERE name LIKE '%token_runs%'") == []
    assert sql(db, "SELECT name FROM sessions") == [("kept",)] and sql(db, "SELECT text FROM notes") == [("note",)]
    with SessionStore.open(db) as store:
        assert store.backup_path is not None
        assert store.list_token_runs(sid) == [] and store.get_session(sid).token_run_count == 0


def test_a_failed_0003_upgrade_is_rolled_back_whole(db):
    alembic(db, "upgrade", "0002")
    sql(db, "INSERT INTO sessions (id, name, created_at, updated_at) VALUES (1, 'old', '2025-05-01 10:00:00', "
            "'2025-05-01 10:00:00')")  # fmt: skip
    sql(db, "CREATE TABLE token_runs (x TEXT)")  # 0003 cannot create its table
    with pytest.raises(StoreError) as failed:
        SessionStore.open(db)
    one_sentence(failed.value, db, "could not be upgraded", "left as it was")
    assert sql(db, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert [row[1] for row in sql(db, "PRAGMA table_info(token_runs)")] == ["x"]
    assert sql(db, "SELECT name FROM sessions") == [("old",)]
    (backup,) = db.parent.glob("sessions.db.bak-0002-*")
    assert sql(backup, "SELECT name FROM sessions") == [("old",)]


# ----------------------------------------------------------------------------- sessions show


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sessions_show_lists_the_token_runs(capsys, store):
    sid = store.create_session("Token study").id
    store.add_model(sid, "/models/vit-b", name="vit-b")
    first = add(store, sid, label="paper setting")
    second = add(
        store, sid, method="tome", options={"threshold": 0.9}, figures={"speedup": 1.2}, images=["/v/a.png", "/v/b.png"]
    )
    bare = add(store, sid, method="todo", model_name="sd15", options={}, figures={})
    store.close()

    code, out, err = run_cli(capsys, "sessions", "show", sid)
    assert code == 0 and err == ""
    lines = out.splitlines()
    at = lines.index("Token runs (3, newest first):")
    assert lines.index("Notes (0):") > at > lines.index("Runs (0, newest first):")
    shown = lines[at + 1 : lines.index("Notes (0):")]
    assert [line.split()[0] for line in shown if line.startswith("  #")] == [
        f"#{bare.id}", f"#{second.id}", f"#{first.id}"
    ]  # fmt: skip
    text = "\n".join(shown)
    assert "todo (defaults)  on sd15" in text and "tome (threshold=0.9)  on vit-b" in text
    assert 'tome (r=13)  on vit-b  "paper setting"' in text
    assert "speed-up 1.84x, cosine of the pooled output (CLS) 0.9877, relative error 0.0432" in text
    assert "speed-up 1.20x, 2 images" in text

    code, out, _ = run_cli(capsys, "sessions", "show", sid, "--json")
    data = json.loads(out)
    assert [r["id"] for r in data["token_runs"]] == [bare.id, second.id, first.id]
    assert data["token_runs"][2]["options"] == {"r": 13} and data["token_runs"][2]["figures"] == FIGURES
    assert data["session"]["token_run_count"] == 3

    code, out, _ = run_cli(capsys, "sessions", "list", "--json")
    assert json.loads(out)[0]["token_run_count"] == 3
