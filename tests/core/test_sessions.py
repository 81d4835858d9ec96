"""core.sessions: the SQLite session store, its migrations, its lock and its failure modes.

Real SQLite files under tmp_path; real child processes for the lock and for a
process killed mid-merge; real SQLite errors (a held write lock, a page limit,
query_only) for the error sentences.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from core.errors import MergeStudioError
from core.sessions import (
    INTERRUPTED_ERROR,
    NoteRecord,
    RunRecord,
    SessionInfo,
    SessionStore,
    StoreCorrupt,
    StoreError,
    StoreLocked,
)
from core.sessions.schema import HEAD

REPO = Path(__file__).resolve().parents[2]
RECIPE = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n"


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
def store(db):
    s = SessionStore.open(db)
    yield s
    s.close()


def python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs
    )


def sql(path: Path, query: str, *params) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(query, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def alembic_upgrade(path: Path, revision: str) -> None:
    from alembic import command
    from sqlalchemy import create_engine

    from core.sessions.store import alembic_config

    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    engine.dispose()


def one_sentence(exc: BaseException, *names: object) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("."), text
    for name in names:
        assert str(name) in text, text
    assert "Traceback" not in text and "sqlalchemy" not in text.lower(), text
    return text


# ----------------------------------------------------------------------------- import and schema


def test_import_does_not_load_sqlalchemy_or_alembic():
    code = (
        "import sys, core.sessions\n"
        "from core.sessions import SessionStore, StoreError, StoreLocked, StoreCorrupt, SessionInfo, ModelRecord, "
        "RecipeVersion, RunRecord, NoteRecord\n"
        "print('sqlalchemy' in sys.modules, 'alembic' in sys.modules)"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_opening_an_up_to_date_database_does_not_load_alembic(db):
    SessionStore.open(db).close()
    code = (
        "import sys\nfrom core.sessions import SessionStore\n"
        "s = SessionStore.open(sys.argv[1])\n"
        "print('alembic' in sys.modules, s.backup_path, len(s.list_sessions()))\ns.close()"
    )
    result = python(code, str(db))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "None", "0"]


def test_a_new_database_is_at_head_and_matches_the_orm(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from core.sessions import schema
    from core.sessions.store import alembic_config

    store = SessionStore.open(db)
    assert store.path == db and store.backup_path is None and store.interrupted_runs == []
    store.close()
    assert sql(db, "SELECT version_num FROM alembic_version") == [(schema.HEAD,)]
    assert not list(db.parent.glob("sessions.db.bak-*"))

    script = ScriptDirectory.from_config(alembic_config())
    assert [r.revision for r in script.walk_revisions()][::-1] == list(schema.REVISIONS)
    assert script.get_current_head() == schema.HEAD

    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), schema.Base.metadata)
    engine.dispose()
    assert diffs == []


def test_every_connection_has_the_pragmas(store):
    one, two = store._engine.raw_connection(), store._engine.raw_connection()  # two pooled connections at once
    try:
        for conn in (one, two):
            values = [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "foreign_keys",
                                                                          "synchronous", "busy_timeout")]
            assert values == ["wal", 1, 1, 5000]
    finally:
        one.close()
        two.close()


# ----------------------------------------------------------------------------- the API


def test_sessions_create_list_rename_delete(store):
    auto = store.create_session()
    assert re.fullmatch(r"Session \d{4}-\d\d-\d\d \d\d:\d\d", auto.name)
    assert auto.created_at.tzinfo is timezone.utc and auto.run_count == 0 and auto.model_count == 0
    first = store.create_session("  First  ")
    assert first.name == "First"
    for bad in ("", "   ", 5):
        with pytest.raises(StoreError):
            store.create_session(bad)  # type: ignore[arg-type]

    assert [s.id for s in store.list_sessions()] == [first.id, auto.id]  # most recent first
    store.save_workspace(auto.id, {"recipe": RECIPE})
    assert [s.id for s in store.list_sessions()] == [auto.id, first.id]
    assert [s.id for s in store.list_sessions(limit=1)] == [auto.id]
    with pytest.raises(StoreError):
        store.list_sessions(limit=-1)

    renamed = store.rename_session(first.id, "Renamed")
    assert renamed.name == "Renamed" and renamed.updated_at > first.updated_at
    assert store.get_session(first.id) == renamed
    assert store.list_sessions()[0].id == first.id
    with pytest.raises(StoreError):
        store.rename_session(first.id, " ")

    with pytest.raises(StoreError) as missing:
        store.get_session(999)
    one_sentence(missing.value, "Session 999 does not exist", store.path)
    assert isinstance(missing.value, MergeStudioError)


def test_delete_session_cascades_to_everything_it_holds(store, db):
    keep, gone = store.create_session("keep"), store.create_session("gone")
    for sid in (keep.id, gone.id):
        store.add_model(sid, "/models/a", name="A")
        version = store.add_recipe_version(sid, RECIPE)
        run = store.start_run(sid, RECIPE, "/out", recipe_version_id=version.id)
        store.finish_run(run.id, "succeeded")
        store.add_note(sid, "note")
    store.delete_session(gone.id)
    with pytest.raises(StoreError):
        store.get_session(gone.id)
    with pytest.raises(StoreError):
        store.delete_session(gone.id)
    for table in ("session_models", "recipe_versions", "merge_runs", "notes"):
        assert sql(db, f"SELECT DISTINCT session_id FROM {table}") == [(keep.id,)], table
    assert store.get_session(keep.id).run_count == 1


def test_models_are_upserted_per_session_and_path(store):
    sid = store.create_session("s").id
    a = store.add_model(sid, Path("/models/a"), name="A", architecture="llama", header_hash="abc")
    b = store.add_model(sid, "/models/b", name="B")
    again = store.add_model(sid, "/models/a", name="A (renamed)")
    assert again.id == a.id and again.name == "A (renamed)"
    assert again.architecture == "llama" and again.header_hash == "abc"  # None keeps what was stored
    assert again.added_at == a.added_at and again.updated_at > a.updated_at
    changed = store.add_model(sid, "/models/a", name="A", header_hash="def")
    assert changed.header_hash == "def"
    assert [m.path for m in store.list_models(sid)] == ["/models/a", "/models/b"]
    assert store.get_session(sid).model_count == 2
    other = store.create_session("other").id
    assert store.add_model(other, "/models/a", name="A").id not in (a.id, b.id)
    with pytest.raises(StoreError):
        store.add_model(sid, "/models/c", name="  ")
    with pytest.raises(StoreError):
        store.add_model(12345, "/models/c", name="C")


def test_recipe_versions_skip_an_unchanged_text_and_list_newest_first(store):
    sid = store.create_session("s").id
    v1 = store.add_recipe_version(sid, RECIPE, method="linear", label="first")
    assert v1.number == 1 and v1.label == "first" and v1.method == "linear"
    assert store.add_recipe_version(sid, RECIPE, label="other label") == v1
    v2 = store.add_recipe_version(sid, RECIPE.replace("0.5", "0.7"), method="linear")
    v3 = store.add_recipe_version(sid, RECIPE)  # the same as v1, but not as the latest: a new version
    assert [v.number for v in store.list_recipe_versions(sid)] == [3, 2, 1]
    assert [v.id for v in store.list_recipe_versions(sid)] == [v3.id, v2.id, v1.id]
    assert store.get_recipe_version(v2.id) == v2
    with pytest.raises(StoreError):
        store.get_recipe_version(999)
    with pytest.raises(StoreError):
        store.add_recipe_version(sid, "  \n")
    other = store.create_session("other").id
    assert store.add_recipe_version(other, RECIPE).number == 1


def test_runs_start_finish_once_and_keep_their_settings(store):
    sid = store.create_session("s").id
    version = store.add_recipe_version(sid, RECIPE)
    settings = {"device": "cpu", "seed": 7, "shard_size": 5_000_000_000, "dtype": "bfloat16"}
    run = store.start_run(sid, RECIPE, Path("/out/a"), method="linear", settings=settings,
                          recipe_version_id=version.id)
    assert run.status == "running" and not run.finished and run.finished_at is None
    assert run.settings == settings and run.output_path == "/out/a" and run.recipe_version_id == version.id
    assert store.get_session(sid).run_count == 1

    done = store.finish_run(run.id, "succeeded", seconds=12.5, peak_memory_bytes=3 << 30)
    assert done.status == "succeeded" and done.finished and done.seconds == 12.5
    assert done.peak_memory_bytes == 3 << 30 and done.finished_at >= done.started_at
    with pytest.raises(StoreError) as twice:
        store.finish_run(run.id, "failed")
    one_sentence(twice.value, f"Run {run.id}", "succeeded")

    second = store.start_run(sid, RECIPE, "/out/b")
    for status in ("running", "interrupted", "done", ""):
        with pytest.raises(StoreError):
            store.finish_run(second.id, status)
    with pytest.raises(StoreError):
        store.finish_run(second.id, "failed", seconds=-1)
    with pytest.raises(StoreError):
        store.finish_run(second.id, "failed", peak_memory_bytes=1.5)  # type: ignore[arg-type]
    failed = store.finish_run(second.id, "failed", error="Tensor x has a NaN.")
    assert failed.error == "Tensor x has a NaN." and failed.seconds is not None and failed.seconds >= 0
    assert failed.settings == {}

    assert [r.id for r in store.list_runs(sid)] == [second.id, run.id]
    assert store.get_run(run.id) == done
    with pytest.raises(StoreError):
        store.get_run(999)
    other = store.create_session("other").id
    with pytest.raises(StoreError) as foreign:
        store.start_run(other, RECIPE, "/out", recipe_version_id=version.id)
    one_sentence(foreign.value, f"Recipe version {version.id}", f"session {sid}")
    with pytest.raises(StoreError):
        store.start_run(sid, RECIPE, "/out", settings={"device": object()})
    with pytest.raises(StoreError):
        store.start_run(sid, RECIPE, "/out", settings=["cpu"])  # type: ignore[arg-type]
    assert len(store.list_runs(sid)) == 2


def test_notes_are_editable(store):
    sid = store.create_session("s").id
    first = store.add_note(sid, "Try TIES next.")
    second = store.add_note(sid, "density 0.3 was too low\nsecond line")
    edited = store.update_note(first.id, "Tried TIES: better.")
    assert edited.created_at == first.created_at and edited.updated_at > first.updated_at
    assert [n.text for n in store.list_notes(sid)] == ["Tried TIES: better.", second.text]
    store.delete_note(second.id)
    assert store.list_notes(sid) == [edited]
    for call in (lambda: store.update_note(second.id, "x"), lambda: store.delete_note(second.id),
                 lambda: store.add_note(999, "x"), lambda: store.add_note(sid, 5)):
        with pytest.raises(StoreError):
            call()


def test_workspace_round_trips_and_a_bad_state_changes_nothing(store):
    sid = store.create_session("s").id
    assert store.load_workspace(sid) is None
    state = {"recipe": RECIPE, "export": {"shard_size": "5GB", "dtype": None}, "slots": [1, 2.5, True]}
    store.save_workspace(sid, state)
    before = store.get_session(sid)
    assert store.load_workspace(sid) == state
    for bad in ({"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]):
        with pytest.raises(StoreError):
            store.save_workspace(sid, bad)  # type: ignore[arg-type]
    assert store.load_workspace(sid) == state and store.get_session(sid) == before


def test_records_are_frozen_plain_values(store):
    sid = store.create_session("s").id
    run = store.start_run(sid, RECIPE, "/out", settings={"seed": 1})
    note = store.add_note(sid, "n")
    for record in (store.get_session(sid), run, note):
        assert dataclasses.is_dataclass(record)
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.id = 5  # type: ignore[misc]
        json.dumps(record.to_dict())
    assert isinstance(run, RunRecord) and isinstance(note, NoteRecord)
    assert isinstance(store.list_sessions()[0], SessionInfo)
    assert store.get_run(run.id).settings is not store.get_run(run.id).settings  # a fresh dict each time


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_threads_can_share_the_store(db, kind):
    store = SessionStore.open(db) if kind == "file" else SessionStore.in_memory()
    sid = store.create_session("s").id
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                store.add_note(sid, f"{n}-{i}")
                store.list_notes(sid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(store.list_notes(sid)) == 40
    finally:
        store.close()


def test_in_memory_store_has_the_same_api_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with SessionStore.in_memory() as memory:
        assert memory.path is None and memory.backup_path is None and memory.interrupted_runs == []
        sid = memory.create_session("m").id
        memory.add_note(sid, "x")
        run = memory.start_run(sid, RECIPE, "/out")
        assert memory.finish_run(run.id, "cancelled").status == "cancelled"
        assert memory.get_session(sid).run_count == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError):
        memory.list_sessions()  # closed


def test_closed_store_refuses_work(db):
    store = SessionStore.open(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError) as closed:
        store.create_session("x")
    one_sentence(closed.value, db, "closed")


# ----------------------------------------------------------------------------- transactions


def test_a_failed_write_leaves_nothing_half_written(store):
    from core.sessions.schema import NoteRow

    sid = store.create_session("s").id
    before = store.get_session(sid)
    now = datetime.now(timezone.utc)
    with pytest.raises(RuntimeError):
        with store._write() as s:
            s.add(NoteRow(session_id=sid, text="half", created_at=now, updated_at=now))
            s.flush()  # inside the database's transaction now
            store._session_row(s, sid).updated_at = now
            s.flush()
            raise RuntimeError("boom")
    assert store.list_notes(sid) == [] and store.get_session(sid) == before


def test_a_full_disk_mid_write_leaves_nothing_half_written(store, db):
    from sqlalchemy import event

    sid = store.create_session("s").id
    store.save_workspace(sid, {"v": 1})
    before = store.get_session(sid)
    pages = sql(db, "PRAGMA page_count")[0][0]

    def limit(dbapi_connection, _record):
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 1}")

    event.listen(store._engine, "connect", limit)
    store._engine.dispose()  # new connections get the limit
    with pytest.raises(StoreError) as full:
        store.add_recipe_version(sid, "x: '" + "y" * 200_000 + "'\n")
    one_sentence(full.value, db, "full")
    with pytest.raises(StoreError):
        store.save_workspace(sid, {"v": "z" * 200_000})
    assert store.list_recipe_versions(sid) == []
    assert store.load_workspace(sid) == {"v": 1} and store.get_session(sid) == before


# ----------------------------------------------------------------------------- SQLite errors


def test_a_database_locked_by_another_program_gives_one_sentence(db):
    store = SessionStore.open(db, busy_timeout=0.05)
    try:
        sid = store.create_session("s").id
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
        try:
            with pytest.raises(StoreError) as locked:
                store.add_note(sid, "x")
            one_sentence(locked.value, db, "locked")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.add_note(sid, "x").text == "x"  # usable again
    finally:
        store.close()


def test_a_read_only_database_gives_one_sentence(store, db):
    from sqlalchemy import event

    sid = store.create_session("s").id
    event.listen(store._engine, "connect", lambda c, _r: c.execute("PRAGMA query_only = ON"))
    store._engine.dispose()
    with pytest.raises(StoreError) as read_only:
        store.add_note(sid, "x")
    one_sentence(read_only.value, db, "read-only")
    assert store.list_notes(sid) == []  # reading still works


def test_disk_io_and_other_errors_are_translated(db):
    from sqlalchemy.exc import OperationalError

    from core.sessions.dbfile import db_error

    io = db_error(OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error")), db)
    assert type(io) is StoreError
    one_sentence(io, db, "disk I/O error")
    other = db_error(sqlite3.OperationalError("something odd\nhappened"), db)
    assert "something odd" in str(other) and str(db) in str(other)
    corrupt = db_error(sqlite3.DatabaseError("database disk image is malformed"), db)
    assert isinstance(corrupt, StoreCorrupt) and corrupt.path == db


# ----------------------------------------------------------------------------- processes


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_process_killed_during_a_merge_leaves_a_consistent_database(db):
    code = (
        "import os, signal, sys\nfrom core.sessions import SessionStore\n"
        "store = SessionStore.open(sys.argv[1])\n"
        "sid = store.create_session('killed').id\n"
        "store.add_recipe_version(sid, 'merge_method: linear\\n')\n"
        "run = store.start_run(sid, 'merge_method: linear\\n', '/out/killed', settings={'seed': 1})\n"
        "print(run.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = python(code, str(db))
    assert result.returncode == -signal.SIGKILL, result.stderr
    run_id = int(result.stdout)
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]
    assert sql(db, "SELECT status FROM merge_runs WHERE id = ?", run_id) == [("running",)]

    store = SessionStore.open(db)  # the dead process's lock is gone with it
    try:
        assert [r.id for r in store.interrupted_runs] == [run_id]
        run = store.get_run(run_id)
        assert run.status == "interrupted" and run.error == INTERRUPTED_ERROR
        assert store.interrupted_runs[0] == run and run.settings == {"seed": 1}
        assert store.list_sessions()[0].name == "killed"
    finally:
        store.close()
    again = SessionStore.open(db)
    assert again.interrupted_runs == []
    again.close()


def test_a_second_instance_is_refused_while_the_first_holds_the_lock(db):
    code = (
        "import sys\nfrom core.sessions import SessionStore\n"
        "store = SessionStore.open(sys.argv[1])\nprint('ready', flush=True)\n"
        "sys.stdin.readline()\nstore.close()\nprint('closed', flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(db)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked) as locked:
            SessionStore.open(db)
        one_sentence(locked.value, db, f"process {child.pid}")
        assert locked.value.pid == child.pid and locked.value.path == db
        with pytest.raises(StoreLocked):
            SessionStore.recover(db)  # never renames a database another process uses
        assert db.exists() and not list(db.parent.glob("*.corrupt-*"))
        with SessionStore.open(db, read_only=True) as reader:  # reading while the app has it
            assert reader.list_sessions() == []
            with pytest.raises(StoreError):
                reader.create_session("x")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:  # pragma: no cover - only if an assertion failed
            child.kill()
        child.stdout.close()
        child.stdin.close()
    with SessionStore.open(db) as store:
        assert store.list_sessions() == []
        with pytest.raises(StoreLocked):  # another open in this same process is refused too
            SessionStore.open(db)


# ----------------------------------------------------------------------------- damaged files


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".lock")}


def test_a_file_that_is_not_sqlite_is_corrupt_and_kept_by_recover(db):
    db.write_bytes(b"this is not a database at all\n" * 20)
    before = listing(db.parent)
    with pytest.raises(StoreCorrupt) as corrupt:
        SessionStore.open(db)
    one_sentence(corrupt.value, db)
    assert corrupt.value.path == db and listing(db.parent) == before  # nothing changed

    store, kept = SessionStore.recover(db)
    try:
        assert re.fullmatch(r"sessions\.db\.corrupt-\d{8}-\d{6}", kept.name) and kept.parent == db.parent
        assert kept.read_bytes() == before["sessions.db"]
        assert store.list_sessions() == [] and store.create_session("fresh").name == "fresh"
    finally:
        store.close()
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_damaged_sqlite_file_is_corrupt_and_recover_keeps_its_wal(db):
    with SessionStore.open(db) as store:
        sid = store.create_session("s").id
        for i in range(60):
            store.add_note(sid, f"{i} " + "x" * 400)
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    data[2 * page: 5 * page] = b"\xa5" * (3 * page)  # garbage over b-tree pages; page 1 (the header) intact
    db.write_bytes(bytes(data))
    wal = Path(f"{db}-wal")
    wal.write_bytes(b"stale write-ahead log")
    before = listing(db.parent)

    with pytest.raises(StoreCorrupt) as corrupt:
        SessionStore.open(db)
    one_sentence(corrupt.value, db)
    assert listing(db.parent) == before

    store, kept = SessionStore.recover(db)
    try:
        assert kept.read_bytes() == before["sessions.db"]
        assert Path(f"{kept}-wal").read_bytes() == b"stale write-ahead log"
        assert store.list_sessions() == []
    finally:
        store.close()
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_sqlite_database_of_another_program_is_refused_untouched(db):
    sql(db, "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    before = listing(db.parent)
    with pytest.raises(StoreCorrupt) as foreign:
        SessionStore.open(db)
    one_sentence(foreign.value, db, "not a Merge Studio sessions database")
    assert listing(db.parent) == before


def test_recover_without_a_database_and_a_missing_folder(tmp_path):
    with pytest.raises(StoreError):
        SessionStore.recover(tmp_path / "sessions.db")
    with pytest.raises(StoreError) as missing:
        SessionStore.open(tmp_path / "nowhere" / "sessions.db")
    one_sentence(missing.value, tmp_path / "nowhere")


# ----------------------------------------------------------------------------- migrations


def test_an_older_database_is_backed_up_then_upgraded(db):
    alembic_upgrade(db, "0001")
    con = sqlite3.connect(db)
    con.executescript(
        """
        INSERT INTO sessions (id, name, created_at, updated_at)
            VALUES (1, 'old session', '2024-05-01 10:00:00.000000', '2024-05-02 11:30:00.000000');
        INSERT INTO session_models (session_id, path, name, architecture, header_hash, added_at, updated_at)
            VALUES (1, '/models/a', 'A', 'llama', 'abc', '2024-05-01 10:00:00.000000', '2024-05-01 10:00:00.000000');
        INSERT INTO recipe_versions (id, session_id, number, yaml_text, method, label, created_at)
            VALUES (1, 1, 1, 'merge_method: ties', 'ties', 'v1', '2024-05-01 10:05:00.000000');
        INSERT INTO merge_runs (id, session_id, recipe_version_id, recipe_yaml, method, status, started_at,
                                finished_at, seconds, output_path, error, settings)
            VALUES (1, 1, 1, 'merge_method: ties', 'ties', 'succeeded', '2024-05-01 10:06:00.000000',
                    '2024-05-01 10:07:00.000000', 60.0, '/out/ties', NULL, '{"seed": 3}'),
                   (2, 1, 1, 'merge_method: ties', 'ties', 'running', '2024-05-02 11:00:00.000000',
                    NULL, NULL, '/out/ties2', NULL, '{}');
        """
    )
    con.commit()
    con.close()
    assert sql(db, "SELECT version_num FROM alembic_version") == [("0001",)]

    store = SessionStore.open(db)
    try:
        backup = store.backup_path
        assert backup is not None and re.fullmatch(r"sessions\.db\.bak-0001-\d{8}-\d{6}", backup.name)
        assert sql(backup, "SELECT version_num FROM alembic_version") == [("0001",)]
        assert sql(backup, "SELECT name FROM sessions") == [("old session",)]
        assert sql(backup, "SELECT status FROM merge_runs ORDER BY id") == [("succeeded",), ("running",)]
        assert sql(backup, "SELECT name FROM sqlite_master WHERE name = 'notes'") == []
        assert sql(db, "SELECT version_num FROM alembic_version") == [(HEAD,)]  # 0001 -> ... -> head

        (session,) = store.list_sessions()
        assert session.name == "old session" and session.run_count == 2 and session.model_count == 1
        assert session.created_at == datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
        assert [m.header_hash for m in store.list_models(1)] == ["abc"]
        assert store.get_recipe_version(1).label == "v1"
        old = store.get_run(1)
        assert old.status == "succeeded" and old.seconds == 60.0 and old.settings == {"seed": 3}
        assert old.peak_memory_bytes is None
        assert [r.id for r in store.interrupted_runs] == [2]
        assert store.load_workspace(1) is None and store.list_notes(1) == []
        store.add_note(1, "after the upgrade")
        store.save_workspace(1, {"recipe": "x"})
    finally:
        store.close()
    with SessionStore.open(db) as again:
        assert again.backup_path is None and again.list_notes(1)[0].text == "after the upgrade"


def test_downgrade_and_upgrade_again_keep_the_rows(db):
    from alembic import command
    from sqlalchemy import create_engine

    from core.sessions.store import alembic_config

    with SessionStore.open(db) as store:
        sid = store.create_session("kept").id
        store.add_model(sid, "/m", name="M")
        store.add_note(sid, "dropped with 0002")
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    engine.dispose()
    assert sql(db, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert sql(db, "SELECT name FROM sessions") == [("kept",)]
    assert sql(db, "SELECT path FROM session_models") == [("/m",)]
    with SessionStore.open(db) as store:
        assert store.backup_path is not None
        assert store.list_models(sid)[0].name == "M" and store.list_notes(sid) == []


def test_a_failed_upgrade_is_rolled_back_whole(db):
    alembic_upgrade(db, "0001")
    sql(db, "INSERT INTO sessions (id, name, created_at, updated_at) VALUES (1, 'old', '2024-05-01 10:00:00', "
            "'2024-05-01 10:00:00')")
    sql(db, "ALTER TABLE sessions ADD COLUMN workspace TEXT")  # 0002 adds it last: that step fails
    with pytest.raises(StoreError) as failed:
        SessionStore.open(db)
    one_sentence(failed.value, db, "could not be upgraded", "left as it was")
    assert sql(db, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert sql(db, "SELECT name FROM sqlite_master WHERE name = 'notes'") == []  # created, then rolled back
    assert "peak_memory_bytes" not in [row[1] for row in sql(db, "PRAGMA table_info(merge_runs)")]
    assert sql(db, "SELECT name FROM sessions") == [("old",)]
    (backup,) = db.parent.glob("sessions.db.bak-0001-*")
    assert sql(backup, "SELECT name FROM sessions") == [("old",)]


def test_json_changed_behind_the_stores_back_is_one_sentence(store, db):
    sid = store.create_session("s").id
    run = store.start_run(sid, RECIPE, "/out")
    sql(db, "UPDATE sessions SET workspace = '{not json'")
    sql(db, "UPDATE merge_runs SET settings = '[oops'")
    with pytest.raises(StoreError) as workspace:
        store.load_workspace(sid)
    one_sentence(workspace.value, f"session {sid}", db, "not valid JSON")
    with pytest.raises(StoreError):
        store.get_run(run.id)


def test_a_folder_name_with_odd_characters(tmp_path):
    folder = tmp_path / "my #1 models? 100% (ä)"
    folder.mkdir()
    with SessionStore.open(folder / "sessions.db") as store:
        store.create_session("odd")
    with SessionStore.open(folder / "sessions.db") as store:
        assert [s.name for s in store.list_sessions()] == ["odd"]
        with SessionStore.open(folder / "sessions.db", read_only=True) as reader:
            assert [s.name for s in reader.list_sessions()] == ["odd"]


def test_a_database_from_a_newer_version_is_refused_untouched(db):
    SessionStore.open(db).close()
    sql(db, "UPDATE alembic_version SET version_num = '9999'")
    before = listing(db.parent)
    with pytest.raises(StoreError) as newer:
        SessionStore.open(db)
    assert not isinstance(newer.value, StoreCorrupt)
    one_sentence(newer.value, db, "newer Merge Studio", "9999")
    assert listing(db.parent) == before
    with pytest.raises(StoreError):
        SessionStore.open(db, read_only=True)
