"""The model library: the user's folders, the models found in them, and what went wrong.

:func:`iter_scan` walks folders (and the local Hugging Face cache) and yields
what it finds in batches, reading only configs and safetensors headers, so a
GUI worker can show models as they appear and stop between two batches.
:class:`ModelLibrary` is a Qt-free model of the result (napari-style): the
app's views connect to its events and never compute anything themselves.

What counts as a model:

* a folder with ``config.json`` and safetensors weights (single file or a
  sharded index), or with ``model_index.json`` (a diffusers pipeline); the scan
  does not look inside a model folder;
* a loose ``.safetensors`` file outside model folders (a single-file checkpoint).

A folder with only pickle weights, a loose ``.ckpt`` file, a corrupt model, a
missing root and a folder too deep to be searched are reported as
:class:`ScanProblem` sentences, never skipped silently. Hidden entries (our own
``.NAME.partial-*`` and ``.NAME.old-*`` folders among them) and ``__pycache__``
are not searched. Symbolic links are followed, each real folder once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import ModelError
from core.events import Event
from core.io.catalog import ModelInfo, describe_model, find_in_hf_cache, hf_cache_dir
from core.jobs import Progress

HF_CACHE_SOURCE = "Hugging Face cache"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Pickle files that hold a model's weights (training folders also hold optimizer.pt and the like).
PICKLE_WEIGHT_STEMS = ("pytorch_model", "model", "diffusion_pytorch_model")
SKIPPED_NAMES = ("__pycache__",)


@dataclass(frozen=True)
class ScanProblem:
    """Something found that is not a usable model, in one sentence naming the file."""

    path: Path
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "message": self.message}


@dataclass(frozen=True)
class ScanBatch:
    """Models and problems found since the previous batch, under one root."""

    root: str
    models: list[ModelInfo]
    problems: list[ScanProblem]
    progress: Progress


@dataclass(frozen=True)
class ScanSummary:
    """The end of a scan: what was searched and how much was found."""

    roots: list[str]
    models: int
    problems: int
    empty_roots: list[str]  # searched, but no model found there
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "roots": list(self.roots),
            "models": self.models,
            "problems": self.problems,
            "empty_roots": list(self.empty_roots),
            "seconds": round(self.seconds, 3),
        }


# ----------------------------------------------------------------------------- scanning


def iter_scan(
    roots: Iterable[str | Path],
    *,
    hf_cache: bool = True,
    max_depth: int = 6,
    batch_size: int = 16,
) -> Generator[ScanBatch, None, ScanSummary]:
    """Find the models under ``roots`` (and in the HF cache); yield batches, return the summary.

    ``max_depth`` counts folders below a root (its own entries are depth 1); a
    folder deeper than that is not searched and is reported as a problem.
    """
    if max_depth < 0:
        raise ValueError("max_depth must be at least 0")
    started = time.monotonic()
    paths = [Path(root).expanduser().absolute() for root in roots]
    cache = hf_cache_dir() if hf_cache else None
    if cache is not None and not cache.is_dir():
        cache = None
    total = len(paths) + (cache is not None)
    searched: list[str] = []
    empty: list[str] = []
    counts = [0, 0]  # models, problems
    visited: set[tuple[int, int]] = set()  # real folders already searched (symlinks, overlapping roots)

    def batches(label: str, found: Iterable[ModelInfo | ScanProblem], done: int) -> Generator[ScanBatch, None, None]:
        models: list[ModelInfo] = []
        problems: list[ScanProblem] = []
        any_model = False
        for item in found:
            (problems if isinstance(item, ScanProblem) else models).append(item)
            if len(models) + len(problems) >= batch_size:
                any_model = any_model or bool(models)
                yield _batch(label, models, problems, done, total, started)
                models, problems = [], []
        any_model = any_model or bool(models)
        yield _batch(label, models, problems, done + 1, total, started)  # the root is finished
        if not any_model:
            empty.append(label)

    for index, root in enumerate(paths):
        label = str(root)
        if not root.is_dir():
            reason = "is not a folder" if root.exists() else "does not exist"
            problem = ScanProblem(root, f"{root}: library folder {reason}.")
            counts[1] += 1
            yield _batch(label, [], [problem], index + 1, total, started)
            continue
        searched.append(label)
        for batch in batches(label, _walk(root, label, max_depth, visited), index):
            counts[0] += len(batch.models)
            counts[1] += len(batch.problems)
            yield batch
    if cache is not None:
        searched.append(HF_CACHE_SOURCE)
        for batch in batches(HF_CACHE_SOURCE, _hf_cache(cache), len(paths)):
            counts[0] += len(batch.models)
            counts[1] += len(batch.problems)
            yield batch
    return ScanSummary(searched, counts[0], counts[1], empty, time.monotonic() - started)


def _batch(
    root: str, models: list[ModelInfo], problems: list[ScanProblem], done: int, total: int, started: float
) -> ScanBatch:
    progress = Progress(done, total, elapsed_s=time.monotonic() - started, message=root)
    return ScanBatch(root, models, problems, progress)


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class _Listing:
    """One folder's entries, read with a single scandir."""

    files: dict[str, str] = field(default_factory=dict)  # name -> path
    folders: dict[str, str] = field(default_factory=dict)


def _list(folder: str) -> _Listing:
    listing = _Listing()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIPPED_NAMES:
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    listing.folders[entry.name] = entry.path
                elif entry.is_file():
                    listing.files[entry.name] = entry.path
            except OSError:
                continue  # a broken link or an entry that vanished: nothing to describe
    return listing


def _folder_kind(listing: _Listing) -> Optional[str]:
    """"model", "pickle" (a model with only pickle weights) or None (an ordinary folder)."""
    names = listing.files
    if "model_index.json" in names:
        return "model"
    has_safetensors = any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    if "config.json" in names and has_safetensors:
        return "model"
    if not has_safetensors and any(_is_pickle_weights(n) for n in names):
        return "pickle"
    return None


def _is_pickle_weights(name: str) -> bool:
    stem, dot, suffix = name.rpartition(".")
    return bool(dot) and f".{suffix}" in PICKLE_SUFFIXES and stem.split("-0")[0] in PICKLE_WEIGHT_STEMS


def _pickle_problem(path: Path) -> ScanProblem:
    return ScanProblem(
        path,
        f"{path}: holds only pickle weights, which can run code when loaded; convert them to safetensors "
        "or allow pickle to load them with weights_only=True.",
    )


def _describe(path: Path, source: str, name: Optional[str] = None) -> ModelInfo | ScanProblem:
    try:
        info = describe_model(path, source=source)
    except ModelError as exc:
        return ScanProblem(path, str(exc))
    if name is not None:
        from dataclasses import replace

        info = replace(info, name=name)
    return info


def _walk(root: Path, label: str, max_depth: int, visited: set[tuple[int, int]]) -> Iterable[ModelInfo | ScanProblem]:
    """Depth-first, in name order; the root is depth 0."""
    stack: list[tuple[str, int]] = [(str(root), 0)]
    while stack:
        folder, depth = stack.pop()
        identity = _identity(folder)
        if identity is None or identity in visited:
            continue
        visited.add(identity)
        try:
            listing = _list(folder)
        except OSError as exc:
            yield ScanProblem(Path(folder), f"{folder}: cannot be read ({exc.strerror or exc}).")
            continue
        kind = _folder_kind(listing)
        if kind == "model":
            yield _describe(Path(folder), label)
            continue
        if kind == "pickle":
            yield _pickle_problem(Path(folder))
            continue
        for name in sorted(listing.files):
            file = Path(listing.files[name])
            if name.endswith(".safetensors"):
                identity = _identity(str(file))
                if identity is not None and identity not in visited:  # a file linked twice is one model
                    visited.add(identity)
                    yield _describe(file, label)
            elif name.endswith(".ckpt"):
                yield ScanProblem(
                    file,
                    f"{file}: is a pickle checkpoint, which can run code when loaded; convert it to safetensors "
                    "or allow pickle to load it with weights_only=True.",
                )
        children = sorted(listing.folders)
        if children and depth + 1 > max_depth:
            for name in children:
                yield ScanProblem(
                    Path(listing.folders[name]),
                    f"{listing.folders[name]}: not searched, it is more than {max_depth} folders below {root}.",
                )
            continue
        for name in reversed(children):  # popped in name order
            stack.append((listing.folders[name], depth + 1))


def _hf_cache(cache: Path) -> Iterable[ModelInfo | ScanProblem]:
    """``models--org--name`` entries: the snapshot of refs/main, else the newest one."""
    try:
        entries = sorted(e.name for e in os.scandir(cache) if e.name.startswith("models--") and e.is_dir())
    except OSError as exc:
        yield ScanProblem(cache, f"{cache}: the Hugging Face cache cannot be read ({exc.strerror or exc}).")
        return
    for entry in entries:
        repo_id = entry.removeprefix("models--").replace("--", "/", 1)
        snapshot = find_in_hf_cache(repo_id)
        if snapshot is None:
            yield ScanProblem(cache / entry, f"{cache / entry}: the cached model {repo_id} has no snapshot.")
            continue
        try:
            kind = _folder_kind(_list(str(snapshot)))
        except OSError as exc:
            yield ScanProblem(snapshot, f"{snapshot}: cannot be read ({exc.strerror or exc}).")
            continue
        if kind == "model":
            yield _describe(snapshot, HF_CACHE_SOURCE, name=repo_id)
        elif kind == "pickle":
            yield _pickle_problem(snapshot)
        else:
            yield ScanProblem(
                snapshot,
                f"{snapshot}: the cached model {repo_id} holds no weights (only part of it was downloaded).",
            )


# ----------------------------------------------------------------------------- the library model


class LibraryEvents:
    """The library's events; each is emitted with no arguments after the change."""

    def __init__(self) -> None:
        self.folders_changed = Event("folders_changed")
        self.models_changed = Event("models_changed")
        self.problems_changed = Event("problems_changed")


class ModelLibrary:
    """The user's library folders and the models found in them (Qt-free).

    Events are emitted on the thread that calls the method; the app changes
    its library on the GUI thread only, applying batches a worker yields.
    """

    def __init__(self, folders: Iterable[str | Path] = ()) -> None:
        self.events = LibraryEvents()
        self._folders: list[Path] = []
        self._models: dict[Path, ModelInfo] = {}
        self._problems: dict[Path, ScanProblem] = {}
        self._scan_found: Optional[set[Path]] = None
        self._scan_roots: list[str] = []
        for folder in folders:
            self.add_folder(folder)

    # -- folders ------------------------------------------------------------
    @property
    def folders(self) -> list[Path]:
        return list(self._folders)

    def add_folder(self, path: str | Path) -> Path:
        """Add a library folder (resolved); adding one already there changes nothing."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            reason = "is not a folder" if folder.exists() else "does not exist"
            raise ModelError(f"{folder}: {reason}, so it cannot be a library folder.")
        folder = folder.resolve()
        if folder not in self._folders:
            self._folders.append(folder)
            self.events.folders_changed.emit()
        return folder

    def remove_folder(self, path: str | Path) -> None:
        """Remove a library folder and the models and problems found under it."""
        folder = Path(path).expanduser().resolve()
        if folder not in self._folders:
            return
        self._folders.remove(folder)
        self.events.folders_changed.emit()
        label = str(folder)
        gone = [p for p, m in self._models.items() if m.source == label or _under(p, folder)]
        for p in gone:
            del self._models[p]
        stale = [p for p in self._problems if _under(p, folder)]
        for p in stale:
            del self._problems[p]
        if gone:
            self.events.models_changed.emit()
        if stale:
            self.events.problems_changed.emit()

    # -- scanning -----------------------------------------------------------
    def begin_scan(self, roots: Iterable[str | Path] = ()) -> None:
        """Start collecting a scan of ``roots``; ``finish_scan`` then drops what was not found again."""
        self._scan_found = set()
        self._scan_roots = [str(Path(r).expanduser().absolute()) for r in roots]

    def apply(self, batch: ScanBatch) -> None:
        """Add or update the batch's models (by path) and problems."""
        if self._scan_found is not None:
            self._scan_found.update(m.path for m in batch.models)
            self._scan_found.update(p.path for p in batch.problems)
        models_changed = bool(batch.models)
        problems_changed = bool(batch.problems)
        for info in batch.models:
            self._models[info.path] = info
            problems_changed |= self._problems.pop(info.path, None) is not None
        for problem in batch.problems:
            self._problems[problem.path] = problem
            models_changed |= self._models.pop(problem.path, None) is not None
        if models_changed:
            self.events.models_changed.emit()
        if problems_changed:
            self.events.problems_changed.emit()

    def finish_scan(self, summary: ScanSummary) -> None:
        """Drop the models and problems under the scanned roots that this scan did not find."""
        found = self._scan_found or set()
        self._scan_found = None
        # A root that has gone missing is not in the summary's roots, but its models are gone too.
        roots = [r for r in dict.fromkeys(self._scan_roots + summary.roots) if r != HF_CACHE_SOURCE]
        self._scan_roots = []
        hf = HF_CACHE_SOURCE in summary.roots

        def rescanned(path: Path, source: str) -> bool:
            if source == HF_CACHE_SOURCE:
                return hf
            return source in roots or any(_under(path, Path(r)) for r in roots)

        gone = [p for p, m in self._models.items() if p not in found and rescanned(p, m.source)]
        for p in gone:
            del self._models[p]
        stale = [p for p in self._problems if p not in found and rescanned(p, "")]
        for p in stale:
            del self._problems[p]
        if gone:
            self.events.models_changed.emit()
        if stale:
            self.events.problems_changed.emit()

    def refresh(self, *, hf_cache: bool = True, max_depth: int = 6) -> ScanSummary:
        """Scan every library folder (and the HF cache) now, in this thread."""
        roots = self.folders
        self.begin_scan(roots)
        work = iter_scan(roots, hf_cache=hf_cache, max_depth=max_depth)
        try:
            while True:
                self.apply(next(work))
        except StopIteration as stop:
            summary: ScanSummary = stop.value
        self.finish_scan(summary)
        return summary

    def add_model(self, path: str | Path, source: str = "") -> ModelInfo:
        """Describe one model (e.g. a merge's output) and add it; ModelError if it is not usable."""
        path = Path(path).expanduser().resolve()
        if not source:
            source = next((str(f) for f in self._folders if _under(path, f)), "")
        info = describe_model(path, source=source)
        self._models[path] = info
        self.events.models_changed.emit()
        if self._problems.pop(path, None) is not None:
            self.events.problems_changed.emit()
        return info

    # -- reading ------------------------------------------------------------
    @property
    def models(self) -> list[ModelInfo]:
        """All models, sorted by name (then path)."""
        return sorted(self._models.values(), key=lambda m: (m.name.casefold(), str(m.path)))

    @property
    def problems(self) -> list[ScanProblem]:
        return sorted(self._problems.values(), key=lambda p: str(p.path))

    def get(self, path: str | Path) -> Optional[ModelInfo]:
        path = Path(path).expanduser()
        return self._models.get(path) or self._models.get(path.resolve())

    def filter(self, text: str) -> list[ModelInfo]:
        """Models matching every word of ``text`` (case-insensitive) in name, architecture,
        dtype, path or provenance tool/method."""
        words = text.casefold().split()
        return [m for m in self.models if all(w in _haystack(m) for w in words)]


def _haystack(info: ModelInfo) -> str:
    parts = [info.name, info.architecture, info.dtype, str(info.path)]
    if info.provenance is not None:
        parts += [info.provenance.tool, info.provenance.method or ""]
    return "\n".join(parts).casefold()


def _under(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


# ----------------------------------------------------------------------------- display helpers


def human_count(n: int) -> str:
    """1234567 -> '1.23M' (parameters)."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return str(n)


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for limit, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= limit:
            return f"{n / limit:.1f} {suffix}"
    return f"{n} B"
