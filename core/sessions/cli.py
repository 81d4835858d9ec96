"""``mergestudio sessions list|show``: the app's sessions from the command line.

    mergestudio sessions list [--json]       sessions, most recently updated first
    mergestudio sessions show ID [--json]    one session: models, recipe versions, runs, token runs, inspections, notes

Reads ``core.paths.home() / "sessions.db"``. A missing database is not created.
While the app has the database open, it is read without the lock (read-only);
otherwise it is opened as the app would (upgraded if older, runs left
"running" by a process that died marked "interrupted").
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from core.sessions.records import SessionInfo, StoreError, StoreLocked, TokenRunRecord
from core.sessions.store import SessionStore, default_path


def add_parser(sub: Any) -> None:
    """Add ``sessions list|show`` to the ``mergestudio`` subcommands."""
    sessions = sub.add_parser("sessions", help="list the app's sessions or show one (models, recipes, runs)")
    commands = sessions.add_subparsers(dest="sessions_command", required=True, metavar="list|show")
    listing = commands.add_parser("list", help="sessions, most recently updated first")
    listing.add_argument("--json", action="store_true", help="print the sessions as JSON")
    listing.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    show = commands.add_parser("show", help="one session: its models, recipe versions, runs, token runs and notes")
    show.add_argument("id", type=int, help="the session's id (see 'mergestudio sessions list')")
    show.add_argument("--json", action="store_true", help="print the session as JSON")
    show.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.sessions_command == "list":
        return list_sessions(as_json=args.json)
    return show_session(args.id, as_json=args.json)


def open_for_reading() -> Optional[SessionStore]:
    """The store, read-only if the app holds it; None if there is no database yet."""
    path = default_path()
    if not path.exists():
        return None
    try:
        return SessionStore.open(path)
    except StoreLocked:
        return SessionStore.open(path, read_only=True)


def list_sessions(*, as_json: bool = False) -> int:
    store = open_for_reading()
    try:
        sessions = store.list_sessions() if store is not None else []
    finally:
        if store is not None:
            store.close()
    if as_json:
        print(json.dumps([s.to_dict() for s in sessions], indent=2))
    elif not sessions:
        print(f"No sessions yet ({default_path()}).")
    else:
        print(format_list(sessions))
    return 0


def show_session(session_id: int, *, as_json: bool = False) -> int:
    store = open_for_reading()
    if store is None:
        raise StoreError(f"Session {session_id} does not exist: there is no sessions database at {default_path()} yet.")
    try:
        data = {
            "database": str(store.path),
            "session": store.get_session(session_id),
            "models": store.list_models(session_id),
            "recipe_versions": store.list_recipe_versions(session_id),
            "runs": store.list_runs(session_id),
            "token_runs": store.list_token_runs(session_id),
            "inspections": store.list_inspections(session_id),
            "notes": store.list_notes(session_id),
            "workspace": store.load_workspace(session_id),
        }
    finally:
        store.close()
    if as_json:
        plain = {k: _plain(v) for k, v in data.items()}
        print(json.dumps(plain, indent=2))
    else:
        print(format_session(data))
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.to_dict() if hasattr(value, "to_dict") else value


def _when(moment: Optional[datetime]) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment is not None else "-"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_list(sessions: list[SessionInfo]) -> str:
    lines = [f"{'ID':>4}  {'Updated':<16}  {'Runs':>4}  {'Models':>6}  Name"]
    for s in sessions:
        lines.append(f"{s.id:>4}  {_when(s.updated_at):<16}  {s.run_count:>4}  {s.model_count:>6}  {s.name}")
    return "\n".join(lines)


def format_session(data: dict[str, Any]) -> str:
    """The text of ``sessions show``: the session, then its models, recipe versions, runs, token runs and notes."""
    s: SessionInfo = data["session"]
    lines = [f"Session {s.id}: {s.name}", f"  created {_when(s.created_at)}, updated {_when(s.updated_at)}"]
    lines.append(f"Models ({len(data['models'])}):")
    for m in data["models"]:
        arch = f"  [{m.architecture}]" if m.architecture else ""
        digest = f"  headers {m.header_hash[:12]}" if m.header_hash else ""
        lines.append(f"  {m.name}{arch}  {m.path}{digest}")
    lines.append(f"Recipe versions ({len(data['recipe_versions'])}, newest first):")
    for v in data["recipe_versions"]:
        label = f'  "{v.label}"' if v.label else ""
        lines.append(f"  v{v.number}  {_when(v.created_at)}  {v.method or '?'}{label}")
    lines.append(f"Runs ({len(data['runs'])}, newest first):")
    for r in data["runs"]:
        cost = f"  {r.seconds:.1f} s" if r.seconds is not None else ""
        if r.peak_memory_bytes is not None:
            cost += f"  peak {_size(r.peak_memory_bytes)}"
        lines.append(f"  #{r.id}  {r.status:<11} {_when(r.started_at)}  {r.method or '?'}{cost}  -> {r.output_path}")
        if r.error:
            lines.append(f"      {' '.join(r.error.split())}")
    lines.extend(format_token_runs(data.get("token_runs", [])))
    lines.extend(format_inspections(data.get("inspections", [])))
    lines.append(f"Notes ({len(data['notes'])}):")
    for n in data["notes"]:
        text = n.text.splitlines() or [""]
        lines.append(f"  {_when(n.updated_at)}  {text[0]}")
        lines.extend(f"                    {line}" for line in text[1:])
    return "\n".join(lines)


def format_token_runs(runs: list[TokenRunRecord]) -> list[str]:
    """The token runs of ``sessions show``: method, options, model, then speed-up and fidelity when measured."""
    lines = [f"Token runs ({len(runs)}, newest first):"]
    for t in runs:
        label = f'  "{t.label}"' if t.label else ""
        what = f"{t.method} ({options_text(t.options)})"
        lines.append(f"  #{t.id}  {_when(t.created_at)}  {what}  on {t.model_name}{label}")
        figures = figures_text(t.figures, len(t.images))
        if figures:
            lines.append(f"      {figures}")
    return lines


def format_inspections(records: list) -> list[str]:
    """The Compare / Inspect results of ``sessions show``: kind, status, models, files."""
    lines = [f"Compare and inspect ({len(records)}, newest first):"]
    for r in records:
        label = f'  "{r.label}"' if r.label else ""
        names = ", ".join(Path(m).name or m for m in r.models)
        files = f"  {len(r.files)} file{'s' if len(r.files) != 1 else ''}" if r.files else ""
        lines.append(f"  #{r.id}  {_when(r.created_at)}  {r.kind:<16} {r.status:<8} {names}{files}{label}")
    return lines


def options_text(options: dict[str, Any]) -> str:
    """``r=13, prop_attn=False``; "defaults" for none."""
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def figures_text(figures: dict[str, Any], images: int = 0) -> str:
    """Speed-up and fidelity of a token run, from the figures it has (bench/lab keys); "" for none."""
    parts = []
    if _number(figures.get("speedup")):
        parts.append(f"speed-up {figures['speedup']:.2f}x")
    metric = figures.get("fidelity_metric")
    of = f" of the {metric}" if isinstance(metric, str) and metric else ""
    if _number(figures.get("cosine")):
        parts.append(f"cosine{of} {figures['cosine']:.4f}")
        of = ""
    if _number(figures.get("relative_error")):
        parts.append(f"relative error{of} {figures['relative_error']:.4f}")
    if images:
        parts.append(f"{images} image{'s' if images != 1 else ''}")
    return ", ".join(parts)
