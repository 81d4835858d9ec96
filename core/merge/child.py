"""Merges in a child process, so an out-of-memory kill cannot take the app down.

Two halves of one small protocol:

* the child is ``mergestudio merge RECIPE -o OUT --progress-jsonl``
  (:func:`serve_jsonl`): stdout carries one JSON object per line, first
  ``progress`` events (at most ~20 a second, always the first and the last),
  then exactly one ``result`` or ``error`` event; a line ``cancel`` on stdin,
  or stdin reaching end-of-file (the parent went away), cancels the merge
  between two tensors;
* the parent is :class:`ChildMerge`: ``run()`` starts the child and turns its
  lines back into :class:`~core.jobs.Progress`, a :class:`ChildResult` or a
  :class:`~core.errors.MergeStudioError`. A child that dies without a word
  (the kernel's OOM killer, a crash) becomes one sentence too, and the
  partial folder it could not remove is removed here.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generator, Optional, Union

from core.errors import CancelledError, MergeStudioError
from core.jobs import CancelToken, Progress
from core.merge.executor import MergeResult

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from core.merge.recipe import Recipe

PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress lines a second
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent  # the folder that holds core/


@dataclass
class ChildResult(MergeResult):
    """A MergeResult, plus the merge process's peak resident memory."""

    peak_rss_bytes: int = 0


# ----------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def rss_bytes() -> int:
    """This process's current resident memory in bytes (the peak where the current is unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


# ----------------------------------------------------------------------------- child side


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _JsonLines:
    """Writes events to stdout, one flushed line each; a closed stdout cancels the merge."""

    def __init__(self, stream: IO[str], token: CancelToken) -> None:
        self.stream = stream
        self.token = token
        self._last = float("-inf")

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(event) + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError, ValueError):  # nobody listens any more: stop, leave nothing
            self.token.cancel()

    def progress(self, p: Progress) -> None:
        now = time.monotonic()
        if p.done > 1 and p.done < p.total and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        self.emit(
            {
                "event": "progress",
                "done": p.done,
                "total": p.total,
                "bytes_done": p.bytes_done,
                "bytes_total": p.bytes_total,
                "elapsed_s": round(p.elapsed_s, 4),
                "eta_s": None if p.eta_s is None else round(p.eta_s, 4),
                "message": p.message,
                "rss_bytes": rss_bytes(),
            }
        )


def _watch_stdin(token: CancelToken) -> None:
    """A daemon thread: a line ``cancel`` or end-of-file on stdin sets ``token``."""
    stdin = sys.stdin
    if stdin is None:  # no stdin at all (a windowed interpreter): nothing to watch
        return

    def watch() -> None:
        try:
            for line in stdin:
                if line.strip() == "cancel":
                    break
        except (OSError, ValueError):
            pass
        token.cancel()

    threading.Thread(target=watch, name="merge-stdin", daemon=True).start()


def serve_jsonl(args: "argparse.Namespace") -> int:
    """``mergestudio merge ... --progress-jsonl``: the merge, reported as JSON lines.

    Errors are reported as an ``error`` event and then re-raised, so the
    command's stderr line and exit status stay those of a plain ``merge``.
    """
    import core.merge as merge

    token = CancelToken()
    out = _JsonLines(sys.stdout, token)
    _watch_stdin(token)
    try:
        from core.cli import merge_options

        result = merge.run(args.recipe, args.output, on_progress=out.progress, cancel=token, **merge_options(args))
    except KeyboardInterrupt:
        out.emit({"event": "error", "kind": "cancelled", "message": "Cancelled by the user; nothing was written."})
        raise
    except CancelledError as exc:
        out.emit({"event": "error", "kind": "cancelled", "message": _one_line(exc)})
        raise
    except MergeStudioError as exc:
        out.emit({"event": "error", "kind": "error", "message": _one_line(exc)})
        raise
    except Exception as exc:
        message = f"Internal error in the merge process: {type(exc).__name__}: {_one_line(exc)}"
        out.emit({"event": "error", "kind": "internal", "message": message})
        raise
    out.emit(
        {
            "event": "result",
            "output": str(result.output),
            "tensors": result.tensors,
            "bytes": result.bytes_written,
            "seconds": round(result.seconds, 3),
            "device": result.device,
            "files": result.files,
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    return 0


# ----------------------------------------------------------------------------- parent side


def _absolute_refs(recipe: "Recipe") -> "Recipe":
    """A copy of ``recipe`` whose references found only beside the recipe file are absolute.

    References that exist as given (absolute, or relative to the current
    folder, which the child shares) and cache ids stay as they are.
    """
    recipe_dir = recipe.source_path.parent if recipe.source_path else None
    fixed = copy.deepcopy(recipe)
    fixed.source_path = None

    def absolute(ref: Optional[str]) -> Optional[str]:
        if ref is None or recipe_dir is None or ref in ("base", "union"):
            return ref
        path = Path(ref).expanduser()
        if path.exists() or path.is_absolute() or not (recipe_dir / path).exists():
            return ref
        found = (recipe_dir / path).absolute()
        tidy = Path(os.path.normpath(found))  # '..' removed, unless a symlink makes that another path
        return str(tidy if tidy.exists() and os.path.samefile(tidy, found) else found)

    fixed.base_model = absolute(fixed.base_model)
    fixed.tokenizer_source = absolute(fixed.tokenizer_source)
    for entry in fixed.models or []:
        entry.model = absolute(entry.model) or entry.model
    for piece in fixed.slices or []:
        piece.base_model = absolute(piece.base_model)
        for entry in piece.sources:
            entry.model = absolute(entry.model) or entry.model
    return fixed


def absolute_refs(recipe: "Recipe") -> "Recipe":
    """A copy of ``recipe`` that means the same from any folder: paths relative to its YAML file made absolute.

    What the merge process is given, and what a session keeps as a run's recipe snapshot.
    """
    return _absolute_refs(recipe)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


class ChildMerge:
    """One merge in a child process: ``run()`` from a worker thread, ``cancel()`` from any.

    ``pid`` is the child's process id while it runs; ``rss_bytes`` its resident
    memory at the latest progress event. ``kill()`` stops it hard; ``run()``
    then raises CancelledError.
    """

    CANCEL_GRACE_S = 30.0  # how long a closed run() waits for the child to clean up before killing it

    def __init__(
        self,
        recipe: Union["Recipe", str, Path],
        output: Union[str, Path],
        *,
        device: str = "auto",
        seed: int = 0,
        shard_size: Optional[int] = None,
        overwrite: bool = False,
        allow_pickle: bool = False,
        model_card: bool = True,
        tensor_delay_s: float = 0.0,
        python: Optional[str] = None,
    ) -> None:
        if shard_size is not None and shard_size <= 0:
            raise MergeStudioError(f"--shard-size must be positive, got {shard_size}.")
        if not (0 <= tensor_delay_s < float("inf")):
            raise MergeStudioError(f"--tensor-delay must be a finite number of seconds >= 0, got {tensor_delay_s}.")
        self.recipe = recipe
        self.output = Path(output)
        self.device = device
        self.seed = seed
        self.shard_size = shard_size
        self.overwrite = overwrite
        self.allow_pickle = allow_pickle
        self.model_card = model_card
        self.tensor_delay_s = tensor_delay_s
        self.python = python
        self.pid: Optional[int] = None
        self.rss_bytes: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._cancel_requested = False
        self._killed = False
        self._stderr: deque[str] = deque(maxlen=20)

    # -- control, from any thread ----------------------------------------------
    def cancel(self) -> None:
        """Ask the child to stop between two tensors; returns at once."""
        with self._lock:
            self._cancel_requested = True
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write("cancel\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):  # already gone, or its stdin closed
                pass

    def kill(self) -> None:
        """Stop the child at once (SIGKILL; TerminateProcess on Windows)."""
        with self._lock:
            self._cancel_requested = True
            self._killed = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass

    # -- the run ---------------------------------------------------------------
    def command(self, recipe_file: Path) -> list[str]:
        """The child's command line."""
        if getattr(sys, "frozen", False):  # the PyInstaller app binary dispatches subcommands
            head = [sys.executable, "merge"]
        else:
            head = [self.python or sys.executable, "-m", "core.cli", "merge"]
        cmd = head + [str(recipe_file), "-o", str(self.output.absolute()), "--progress-jsonl"]
        cmd += ["--device", self.device, "--seed", str(self.seed)]
        if self.shard_size is not None:
            cmd += ["--shard-size", str(self.shard_size)]
        if self.overwrite:
            cmd.append("--overwrite")
        if self.allow_pickle:
            cmd.append("--allow-pickle")
        if not self.model_card:
            cmd.append("--no-card")
        if self.tensor_delay_s:
            cmd += ["--tensor-delay", repr(float(self.tensor_delay_s))]
        return cmd

    def run(self) -> Generator[Progress, None, ChildResult]:
        """Start the child and yield its Progress; return its ChildResult.

        Raises MergeStudioError with the child's sentence, CancelledError when
        cancelled (or killed with ``kill()``). Closing the generator cancels the
        child and waits for it to clean up.
        """
        from core.merge import load_recipe
        from core.merge.recipe import Recipe
        from core.paths import cache_dir

        recipe = self.recipe if isinstance(self.recipe, Recipe) else load_recipe(self.recipe)
        text = _absolute_refs(recipe).to_yaml()
        before = self._partials()
        existed = self.output.exists()
        fd, name = tempfile.mkstemp(prefix="child-recipe-", suffix=".yaml", dir=cache_dir())
        recipe_file = Path(name)
        result: Optional[dict[str, Any]] = None
        error: Optional[dict[str, Any]] = None
        finished = False
        proc: Optional[subprocess.Popen] = None
        stderr_reader: Optional[threading.Thread] = None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            with self._lock:
                if self._cancel_requested:
                    raise CancelledError()
                proc = self._proc = self._start(recipe_file)
                self.pid = proc.pid
            stderr_reader = threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True)
            stderr_reader.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                event = self._parse(line)
                if event is None:
                    continue
                kind = event.get("event")
                if kind == "progress":
                    self.rss_bytes = event.get("rss_bytes")
                    yield Progress(
                        int(event["done"]),
                        int(event["total"]),
                        int(event.get("bytes_done", 0)),
                        int(event.get("bytes_total", 0)),
                        float(event.get("elapsed_s", 0.0)),
                        str(event.get("message", "")),
                    )
                elif kind == "result":
                    result = event
                elif kind == "error":
                    error = event
            proc.wait()
            finished = True
        finally:
            if proc is not None:
                self._stop(proc, graceful=not finished)
                if stderr_reader is not None:
                    stderr_reader.join(timeout=5)
            recipe_file.unlink(missing_ok=True)
            if result is None:
                self._remove_partials(before)
        assert proc is not None
        if result is not None:
            return ChildResult(
                output=self.output,
                tensors=int(result["tensors"]),
                bytes_written=int(result["bytes"]),
                seconds=float(result["seconds"]),
                device=str(result["device"]),
                files=list(result.get("files", [])),
                peak_rss_bytes=int(result.get("peak_rss_bytes", 0)),
            )
        if self._killed:
            raise CancelledError(f"The merge process was stopped; nothing was written to {self.output}.")
        if error is not None:
            message = str(error.get("message", "")) or "The merge process failed."
            if error.get("kind") == "cancelled":
                raise CancelledError(message)
            raise MergeStudioError(message)
        raise MergeStudioError(self._death_sentence(proc.returncode, existed))

    # -- helpers ---------------------------------------------------------------
    def _start(self, recipe_file: Path) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            return subprocess.Popen(
                self.command(recipe_file),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=env,
            )
        except OSError as exc:
            raise MergeStudioError(f"Cannot start the merge process ({exc.strerror or exc}).") from None

    def _stop(self, proc: subprocess.Popen, graceful: bool) -> None:
        """Reap the child in every path: ask it to stop first when it may still be working."""
        if graceful and proc.poll() is None:
            self.cancel()
            try:
                proc.wait(timeout=self.CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with self._lock:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            self._proc = None

    def _read_stderr(self, stream: Optional[IO[str]]) -> None:
        if stream is None:
            return
        try:
            for line in stream:
                if line.strip():
                    self._stderr.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    @staticmethod
    def _parse(line: str) -> Optional[dict[str, Any]]:
        """One event, or None for a line that is not one (a library printing to stdout)."""
        line = line.strip()
        if not line.startswith("{"):
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event if isinstance(event, dict) else None

    def _partials(self) -> set[Path]:
        parent = self.output.absolute().parent
        if not parent.is_dir():
            return set()
        return set(parent.glob(f".{self.output.absolute().name}.partial-*"))

    def _remove_partials(self, before: set[Path]) -> None:
        """Remove the partial folders the child left (it cannot clean up after SIGKILL)."""
        import shutil

        for path in self._partials() - before:
            shutil.rmtree(path, ignore_errors=True)

    def _death_sentence(self, code: Optional[int], existed: bool) -> str:
        """One sentence for a child that ended without a result or an error event."""
        last = self._stderr[-1].strip() if self._stderr else ""
        if not existed and self.output.exists():
            outcome = f"{self.output} had already been written in full"
        else:
            outcome = f"nothing was written to {self.output}"
        if code is not None and code < 0:
            number = -code
            what = f"The merge process was killed by signal {number} ({_signal_name(number)})"
            if number == getattr(signal, "SIGKILL", 9):
                return f"{what}, most likely because it ran out of memory; {outcome}."
        else:
            what = f"The merge process exited with status {code} without reporting a result"
        detail = f" (its last message: {last.rstrip('.')})" if last else ""
        return f"{what}{detail}; {outcome}."
