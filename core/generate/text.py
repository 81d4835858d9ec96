"""The same prompt and seed through 2-4 causal LMs, streamed token by token and timed.

Panes run one after another: load the model (a local folder, or a recipe merged in
memory by :mod:`core.generate.in_memory`), generate, free it; memory holds one model
at a time. :func:`iter_compare_text` is a generator of events a GUI worker forwards
(``PaneStarted``, ``PaneMerging``, ``PaneToken``, ``PaneFinished``); :func:`compare_text`
drives it.

Decoding is our own loop over ``model(input_ids, cache=...)`` (the KV cache) so that Stop
takes effect between two tokens and sampling draws from a per-pane
``torch.Generator`` seeded with ``settings.seed`` (same seed, same text; identical
models, identical panes). Logits are processed in the order transformers' ``generate``
uses, so greedy and seeded sampling give its tokens:

1. repetition penalty (Keskar et al., "CTRL", 2019, https://arxiv.org/abs/1909.05858,
   section 4.1): a logit ``l`` of a token already in the prompt or the output becomes
   ``l / p`` when ``l > 0`` and ``l * p`` otherwise;
2. ``temperature == 0``: greedy (argmax); otherwise ``logits / temperature``;
3. top-k (Fan et al., "Hierarchical Neural Story Generation", 2018,
   https://arxiv.org/abs/1805.04833): logits below the k-th largest are dropped;
4. top-p / nucleus (Holtzman et al., "The Curious Case of Neural Text Degeneration",
   2020, https://arxiv.org/abs/1904.09751): the smallest set of most likely tokens
   whose probability sums to at least ``top_p`` is kept;
5. a draw from the softmax with ``torch.multinomial(..., generator=...)``.

Timings leave out the time the consumer of the generator holds it suspended (a GUI
drawing a token), so they measure the model, not the window.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional, Union

from core.errors import MergeStudioError
from core.jobs import CancelToken, drive

if TYPE_CHECKING:  # pragma: no cover
    import torch

MIN_PANES, MAX_PANES = 2, 4
CUDA_MEMORY = "cuda max allocated"
RSS_MEMORY = "process RSS peak above the start of the pane (sampled)"
NO_MEMORY = "unavailable"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"
)
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


# ----------------------------------------------------------------------------- settings and sources


@dataclass
class TextSettings:
    """What every pane generates from."""

    prompt: str
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    chat_template: bool = False  # wrap the prompt with the tokenizer's chat template when it has one

    def validate(self) -> None:
        """Raise MergeStudioError naming the first field out of range."""
        if not isinstance(self.prompt, str):
            raise MergeStudioError(f"prompt: expected text, got {type(self.prompt).__name__}.")
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("max_new_tokens", self.max_new_tokens, 1, None)
        _integer("top_k", self.top_k, 0, None)
        _number("temperature", self.temperature, lambda v: v >= 0, "a finite number >= 0 (0 is greedy)")
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a finite number > 0 (1 is off)")
        if not isinstance(self.chat_template, bool):
            raise MergeStudioError(f"chat_template: expected true or false, got {self.chat_template!r}.")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TextSettings":
        return cls(**_known_fields(cls, d, "text settings"))


@dataclass
class TextSource:
    """One pane: a local causal-LM folder, or a recipe merged in memory (exactly one of the two)."""

    label: str
    model: Optional[str] = None  # a local HF causal-LM folder
    recipe: Union[str, dict, None] = None  # mergekit recipe (YAML path or dict), merged in memory


# ----------------------------------------------------------------------------- events and results


@dataclass
class PaneStarted:
    pane: int
    label: str


@dataclass
class PaneMerging:
    """Progress of a recipe pane's in-memory merge (one event per tensor)."""

    pane: int
    done: int
    total: int


@dataclass
class PaneToken:
    """A decoded text piece to append to the pane; ``index`` counts pieces from 0."""

    pane: int
    text: str
    index: int


@dataclass
class PaneFinished:
    pane: int
    result: Any  # PaneResult here, ImageResult in core.generate.image


@dataclass
class PaneResult:
    """What one pane produced, with its numbers.

    ttft_s: seconds from the start of the prompt's forward pass to the first token.
    tokens_per_s: (new_tokens - 1) / seconds from the first to the last token (decode
    speed; None below two tokens). total_s: the whole pane, loading included.
    new_tokens counts the end-of-sequence token when one ended the text.
    """

    pane: int
    label: str
    model: Optional[str]
    text: str
    new_tokens: int
    prompt_tokens: int
    ttft_s: Optional[float]
    tokens_per_s: Optional[float]
    total_s: float
    peak_memory_bytes: Optional[int]
    memory_kind: str  # CUDA_MEMORY, RSS_MEMORY or NO_MEMORY
    status: str  # "done" | "stopped" | "failed"
    error: Optional[str]
    finish_reason: Optional[str]  # "eos" | "length" | "stopped"
    notes: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the generated ids (prompt excluded)
    load_s: Optional[float] = None  # loading (and merging) the model

    def to_json(self) -> dict:
        return asdict(self)


TextEvent = Union[PaneStarted, PaneMerging, PaneToken, PaneFinished]


# ----------------------------------------------------------------------------- pure pieces


class StreamDecoder:
    """Token ids in, text pieces out; the pieces add up to the decoded text.

    Decoding ids one by one is wrong for byte-level BPE (a character split over
    several tokens) and sentencepiece (the space a token carries is dropped at the
    start of a decode). Each piece is the difference between decoding a window
    that ends at the new token and the same window without it; the window starts
    at the previous piece's tokens, which give the context, so the cost per token
    stays constant. A decode ending in U+FFFD (an incomplete UTF-8 sequence) waits
    for the next token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the previous piece's first token
        self._read = 0  # tokens already turned into pieces
        self.emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            piece = now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted += piece
            return piece
        return ""

    def flush(self) -> str:
        """At the end: whatever the full decode has beyond the pieces so far (e.g. a lone U+FFFD)."""
        full = self.text()
        if full.startswith(self.emitted) and len(full) > len(self.emitted):
            piece = full[len(self.emitted) :]
            self.emitted = full
            self._prefix = self._read = len(self.ids)
            return piece
        return ""

    def text(self) -> str:
        return self._decode(self.ids)


def process_logits(
    logits: "torch.Tensor", seen: "torch.Tensor", settings: TextSettings
) -> "torch.Tensor":
    """Repetition penalty, temperature, top-k and top-p on ``logits [V]`` (float32).

    ``seen [S]`` holds the ids of the prompt and the output so far. Dropped tokens
    get ``-inf``. With ``temperature == 0`` only the penalty is applied (greedy).
    """
    import torch

    if settings.repetition_penalty != 1.0 and seen.numel():
        scores = logits.gather(0, seen)
        scores = torch.where(scores > 0, scores / settings.repetition_penalty, scores * settings.repetition_penalty)
        logits = logits.scatter(0, seen, scores)
    if settings.temperature == 0:
        return logits
    logits = logits / settings.temperature
    vocab = logits.shape[-1]
    if 0 < settings.top_k < vocab:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= settings.top_p  # the most likely token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_token(logits: "torch.Tensor", settings: TextSettings, generator: "torch.Generator") -> int:
    """Greedy argmax at temperature 0, else a draw from softmax(logits) with ``generator``."""
    import torch

    if settings.temperature == 0:
        return int(torch.argmax(logits))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.unsqueeze(0), 1, generator=generator)[0, 0])


# ----------------------------------------------------------------------------- measuring


class _Clock:
    """Seconds of work: stops while the generator is suspended at a yield."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._paused = 0.0
        self._since: Optional[float] = None

    def pause(self) -> None:
        self._since = time.perf_counter()

    def resume(self) -> None:
        if self._since is not None:
            self._paused += time.perf_counter() - self._since
            self._since = None

    def now(self) -> float:
        end = self._since if self._since is not None else time.perf_counter()
        return end - self._start - self._paused


def _rss_reader() -> Optional[Callable[[], int]]:
    try:
        import psutil

        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)
    except ImportError:
        pass
    try:
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as fh:
            fh.read()

        def read() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page

        return read
    except (OSError, ValueError, AttributeError):
        return None


class MemoryMonitor:
    """Peak memory of one pane: CUDA max allocated, or the process RSS sampled every 10 ms above its start."""

    def __init__(self, device: str, interval_s: float = 0.01) -> None:
        self.device = device
        self.interval_s = interval_s
        self.kind = NO_MEMORY
        self._baseline = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._read: Optional[Callable[[], int]] = None

    def start(self) -> "MemoryMonitor":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = CUDA_MEMORY
            return self
        self._read = _rss_reader()
        if self._read is None:
            return self
        self.kind = RSS_MEMORY
        self._baseline = self._peak = self._read()
        self._thread = threading.Thread(target=self._sample, name="pane-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._read())

    def stop(self) -> Optional[int]:
        """Stop sampling; the peak in bytes (None when it cannot be measured)."""
        if self.kind == CUDA_MEMORY:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        assert self._read is not None
        self._peak = max(self._peak, self._read())
        return self._peak - self._baseline


def free_memory(device: str) -> None:
    """Return what the last pane held to the device (the CUDA cache).

    No ``gc.collect()`` here: a loaded model is freed by reference counting when the
    pane drops it (tested), and a full collection holds the interpreter lock for a
    few hundred milliseconds, which would stall the app's window; in the app,
    garbage is collected on the GUI thread only (app/gc_control.py).
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- preparing a pane


@dataclass
class _Prepared:
    """What is known about a pane before its weights load (tokenizer, prompt ids, or the error)."""

    where: str  # the folder or recipe, for messages
    model: Optional[str]
    tokenizer: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    fingerprint: str = ""
    vocab: int = 0
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def _check_sources(sources: list[TextSource]) -> None:
    if not isinstance(sources, (list, tuple)) or not MIN_PANES <= len(sources) <= MAX_PANES:
        count = len(sources) if isinstance(sources, (list, tuple)) else type(sources).__name__
        raise MergeStudioError(f"sources: compare {MIN_PANES} to {MAX_PANES} models side by side, got {count}.")
    for i, s in enumerate(sources):
        if (s.model is None) == (s.recipe is None):
            raise MergeStudioError(f"sources[{i}] ('{s.label}'): give exactly one of model or recipe.")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(folder: Path, where: str):
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise MergeStudioError(f"{where}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}).")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise MergeStudioError(f"{where}: its tokenizer cannot be loaded ({_reason(exc)}).") from None


def _prepare(source: TextSource, settings: TextSettings) -> _Prepared:
    """Tokenizer and prompt ids (cheap: no weights are read)."""
    from core.generate.in_memory import as_recipe, describe

    if source.model is not None:
        folder = Path(source.model).expanduser()
        prep = _Prepared(str(folder), str(folder))
        tok_folder, template = folder, None
        if not folder.is_dir():
            prep.error = f"{folder}: no such model folder."
            return prep
    else:
        from core.merge.plan import plan_merge

        prep = _Prepared(describe(source.recipe), None)
        try:
            plan = plan_merge(as_recipe(source.recipe))
        except MergeStudioError as exc:
            prep.error = str(exc)
            return prep
        except Exception as exc:  # noqa: BLE001 - a recipe that breaks the planner fails its own pane only
            prep.error = f"{prep.where}: cannot be planned as a merge ({_reason(exc)})."
            return prep
        try:
            if plan.models[plan.config_model or 0].source.kind == "diffusers":
                prep.error = (
                    f"{prep.where}: merges a diffusers pipeline; text generation needs a causal language model."
                )
                return prep
            idx = plan.tokenizer_model if plan.tokenizer_model is not None else plan.config_model or 0
            tok_folder = plan.models[idx].source.path
            template = plan.recipe.chat_template
        finally:
            plan.close()
        prep.where = f"{prep.where} (tokenizer from {tok_folder})"
    try:
        tok = _load_tokenizer(tok_folder, prep.where if source.model is not None else str(tok_folder))
        if template is not None:
            tok.chat_template = _resolve_template(template, tok_folder)
        prep.tokenizer = tok
        prep.prompt_ids = _encode_prompt(tok, settings, prep)
        vocab = tok.get_vocab()
    except MergeStudioError as exc:
        prep.error = str(exc)
        return prep
    except Exception as exc:  # noqa: BLE001 - a tokenizer that breaks on this prompt fails its own pane only
        prep.error = f"{prep.where}: its tokenizer failed on the prompt ({_reason(exc)})."
        return prep
    prep.vocab = len(vocab)
    digest = hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    prep.fingerprint = f"{digest}:{prep.prompt_ids}"
    return prep


def _resolve_template(template: str, folder: Path) -> Optional[str]:
    from core.merge.executor import CHATML_TEMPLATE, _read_template

    if template == "chatml":
        return CHATML_TEMPLATE
    if template == "auto":
        return _read_template(folder / "tokenizer_config.json")
    return template


def _encode_prompt(tok, settings: TextSettings, prep: _Prepared) -> list[int]:
    if settings.chat_template:
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(
                    [{"role": "user", "content": settings.prompt}], tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:
                raise MergeStudioError(f"{prep.where}: its chat template cannot be applied ({_reason(exc)}).") from None
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS
        else:
            prep.notes.append("The tokenizer has no chat template; the prompt was used as it is.")
            ids = tok(settings.prompt)["input_ids"]
    else:
        ids = tok(settings.prompt)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        if tok.bos_token_id is None:
            raise MergeStudioError(
                f"{prep.where}: the prompt is empty and the tokenizer has no BOS token to start from."
            )
        ids = [int(tok.bos_token_id)]
        prep.notes.append("The prompt is empty; generation starts from the BOS token.")
    return ids


def _tokenizer_notes(preps: list[_Prepared], sources: list[TextSource]) -> None:
    """Tokenizers that differ make token counts (and tokens/s) incomparable: say so on every pane."""
    ready = [(i, p) for i, p in enumerate(preps) if p.error is None]
    if len({p.fingerprint for _, p in ready}) <= 1:
        return
    listing = "; ".join(
        f"pane {i} '{sources[i].label}': {p.vocab}-token vocabulary, prompt of {len(p.prompt_ids)} tokens"
        for i, p in ready
    )
    note = f"The panes use different tokenizers ({listing}), so their token counts and tokens/s are not comparable."
    for _, p in ready:
        p.notes.append(note)


# ----------------------------------------------------------------------------- loading a model


def _max_positions(config) -> Optional[int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _MAX_POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_causal(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    names = set()
    for value in CAUSAL.values():
        names.update([value] if isinstance(value, str) else value)
    archs = getattr(config, "architectures", None) or []
    if archs:
        if not any(a in names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise MergeStudioError(
                f"{where}: is a {archs[0]} (config.json architectures), not a causal language model."
            )
    elif config.model_type not in CAUSAL:
        raise MergeStudioError(f"{where}: model type '{config.model_type}' is not a causal language model.")


def _config_of(source: TextSource, where: str, merged=None):
    import transformers

    if merged is not None:
        if merged.config is None:
            raise MergeStudioError(f"{where}: the merged model has no config.json.")
        try:
            return transformers.CONFIG_MAPPING[merged.config["model_type"]].from_dict(dict(merged.config))
        except (KeyError, ValueError) as exc:
            raise MergeStudioError(f"{where}: the merged model's config cannot be read ({_reason(exc)}).") from None
    folder = Path(source.model).expanduser()  # type: ignore[arg-type]
    if not (folder / "config.json").is_file():
        raise MergeStudioError(f"{where}: has no config.json.")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise MergeStudioError(f"{where}: config.json cannot be read ({_reason(exc)}).") from None


def _load_model(source: TextSource, config, where: str, device: str, merged=None):
    """The causal LM on ``device`` in eval mode (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        if merged is not None:
            # transformers' own loading path (key conversions, tied weights, buffers) from the tensors in
            # memory; the Auto class wants a folder, the concrete class takes a state dict (no copy is made).
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model = cls.from_pretrained(None, config=config, state_dict=merged.state, dtype="auto")
            if (merged.folder / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(merged.folder))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(Path(source.model).expanduser()),  # type: ignore[arg-type]
                config=config,
                dtype="auto",
                use_safetensors=True,
                local_files_only=True,
            )
    except (MemoryError, MergeStudioError):
        raise
    except Exception as exc:
        if _is_oom(exc):
            raise
        raise MergeStudioError(f"{where}: cannot be loaded as a causal language model ({_reason(exc)}).") from None
    return model.to(device).eval()


def _cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during v5: use whichever forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _eos_ids(model, tok) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if not ids and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- the comparison


def iter_compare_text(
    sources: list[TextSource],
    settings: TextSettings,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
) -> Generator[TextEvent, None, list[PaneResult]]:
    """Generate ``settings`` through each source in turn; yield events; return the results.

    The sources, the settings and the device are checked now (MergeStudioError);
    everything that goes wrong inside a pane (no tokenizer, not a causal LM, prompt
    too long, out of memory, a bad recipe) ends that pane "failed" with one sentence
    and the next pane runs. ``cancel`` stops between two tokens: the pane ends
    "stopped" with the text so far and the panes after it end "stopped" unstarted.
    Closing the generator frees the model too.
    """
    from core.merge.executor import resolve_device

    _check_sources(sources)
    settings.validate()
    dev = resolve_device(device)
    return _compare(list(sources), settings, dev, cancel or CancelToken())


def compare_text(
    sources: list[TextSource],
    settings: TextSettings,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
    on_event: Optional[Callable[[TextEvent], None]] = None,
) -> list[PaneResult]:
    """Run :func:`iter_compare_text` to the end (``on_event`` sees every event); return the results."""
    # ``cancel`` goes to the comparison, not to drive(): a stopped run still returns its panes.
    return drive(iter_compare_text(sources, settings, device=device, cancel=cancel), on_event)


def _compare(
    sources: list[TextSource], settings: TextSettings, device: str, cancel: CancelToken
) -> Generator[TextEvent, None, list[PaneResult]]:
    preps = [_prepare(s, settings) for s in sources]
    _tokenizer_notes(preps, sources)
    results: list[PaneResult] = []
    for pane, (source, prep) in enumerate(zip(sources, preps)):
        if cancel.cancelled:
            result = _empty_result(pane, source, prep, "stopped", None)
            result.finish_reason = "stopped"
            result.notes.append("Not started: the comparison was stopped before this pane.")
        else:
            yield PaneStarted(pane, source.label)
            result = yield from _run_pane(pane, source, prep, settings, device, cancel)
        results.append(result)
        yield PaneFinished(pane, result)
    return results


def _empty_result(pane: int, source: TextSource, prep: _Prepared, status: str, error: Optional[str]) -> PaneResult:
    return PaneResult(
        pane=pane, label=source.label, model=prep.model, text="", new_tokens=0, prompt_tokens=len(prep.prompt_ids),
        ttft_s=None, tokens_per_s=None, total_s=0.0, peak_memory_bytes=None, memory_kind=NO_MEMORY,
        status=status, error=error, finish_reason=None, notes=list(prep.notes),
    )


def _run_pane(
    pane: int, source: TextSource, prep: _Prepared, settings: TextSettings, device: str, cancel: CancelToken
) -> Generator[TextEvent, None, PaneResult]:
    import torch

    result = _empty_result(pane, source, prep, "failed", prep.error)
    if prep.error is not None:
        return result
    clock = _Clock()
    monitor = MemoryMonitor(device).start()
    model = merged = steps = None
    decoder = StreamDecoder(prep.tokenizer)
    t_first = t_last = None
    phase = "loading the model"
    try:
        if source.recipe is not None:
            merged = yield from _merge(pane, source, device, clock, cancel)
            if merged is None:
                result.status, result.finish_reason = "stopped", "stopped"
                return result
            from core.generate.in_memory import size_text

            result.notes.extend(merged.notes)
            result.notes.append(f"Merged in memory ({size_text(merged.bytes)}); config from {merged.folder}.")
        config = _config_of(source, prep.where, merged)
        _check_causal(config, prep.where)
        limit = _max_positions(config)
        n_prompt = len(prep.prompt_ids)
        # The model sees the prompt and every new token but the last, which is never fed back:
        # n_prompt + max_new_tokens - 1 positions.
        if limit is not None and n_prompt > limit:
            raise MergeStudioError(
                f"{prep.where}: the prompt is {n_prompt} tokens, more than the model's {limit} positions."
            )
        if limit is not None and n_prompt + settings.max_new_tokens - 1 > limit:
            raise MergeStudioError(
                f"{prep.where}: the prompt ({n_prompt} tokens) plus max_new_tokens={settings.max_new_tokens} "
                f"needs {n_prompt + settings.max_new_tokens - 1} of the model's {limit} positions; "
                f"lower max_new_tokens to {limit - n_prompt + 1} or less."
            )
        model = _load_model(source, config, prep.where, device, merged)
        merged = None  # the model holds the weights now
        result.load_s = clock.now()
        if cancel.cancelled:  # Stop was pressed while the model loaded: run nothing
            result.status, result.finish_reason, result.error = "stopped", "stopped", None
            result.notes.append("Stopped while the model loaded; nothing was generated.")
            return result
        eos = _eos_ids(model, prep.tokenizer)
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        phase = "generating"
        t_start = clock.now()
        steps = _Steps(model, prep.prompt_ids, settings, generator, device)
        token = steps.first()
        while True:
            now = clock.now()
            t_first = now if t_first is None else t_first
            t_last = now
            result.token_ids.append(token)
            piece = decoder.push(token)
            if piece:
                yield from _emit(PaneToken(pane, piece, result.new_tokens), clock)
            result.new_tokens += 1
            if token in eos:
                result.finish_reason = "eos"
                break
            if len(result.token_ids) >= settings.max_new_tokens:
                result.finish_reason = "length"
                break
            if cancel.cancelled:
                result.finish_reason = "stopped"
                break
            token = steps.next(token)
        steps = None
        piece = decoder.flush()
        if piece:
            yield from _emit(PaneToken(pane, piece, result.new_tokens), clock)
        result.status = "stopped" if result.finish_reason == "stopped" else "done"
        result.error = None
        result.ttft_s = None if t_first is None else t_first - t_start
        if t_first is not None and t_last is not None and result.new_tokens >= 2 and t_last > t_first:
            result.tokens_per_s = (result.new_tokens - 1) / (t_last - t_first)
    except MergeStudioError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - OOM is a failed pane; anything else too, said in one sentence
        result.status = "failed"
        if _is_oom(exc):
            result.error = f"{prep.where}: ran out of memory while {phase} on {device}."
        else:
            result.error = f"{prep.where}: failed while {phase} ({_reason(exc)})."
    finally:
        result.text = decoder.text()
        model = merged = steps = None  # nothing of the pane stays referenced while memory is freed
        result.total_s = clock.now()
        result.peak_memory_bytes = monitor.stop()
        result.memory_kind = monitor.kind
        free_memory(device)
    return result


class _Steps:
    """The decoding state of one pane: the KV cache, the ids seen, the sampler.

    Each call runs under ``torch.inference_mode`` on its own, never across a
    yield: the mode is thread-local, and the consumer runs in this thread while
    the generator is suspended.
    """

    def __init__(self, model, prompt_ids: list[int], settings: TextSettings, generator, device: str) -> None:
        import torch

        self.model = model
        self.settings = settings
        self.generator = generator
        self.device = device
        self.cache_arg = _cache_argument(model)
        self.seen = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        self.cache = None

    def _pick(self, out) -> int:
        import torch

        self.cache = _cache_of(out)
        logits = out.logits[0, -1].float()
        token = choose_token(process_logits(logits, self.seen, self.settings), self.settings, self.generator)
        self.seen = torch.cat([self.seen, torch.tensor([token], dtype=torch.long, device=self.device)])
        return token

    def first(self) -> int:
        """Run the prompt; the first new token."""
        import torch

        with torch.inference_mode():
            return self._pick(self.model(input_ids=self.seen.unsqueeze(0), use_cache=True))

    def next(self, token: int) -> int:
        """Feed ``token`` (through the cache); the token after it."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            return self._pick(self.model(input_ids=ids, use_cache=True, **{self.cache_arg: self.cache}))


def _emit(event: TextEvent, clock: _Clock) -> Generator[TextEvent, None, None]:
    """Yield with the clock stopped (the consumer's time is not the model's)."""
    clock.pause()
    try:
        yield event
    finally:
        clock.resume()


def _merge(pane: int, source: TextSource, device: str, clock: _Clock, cancel: CancelToken):
    """The recipe merged in memory, with a PaneMerging per tensor; None when stopped."""
    from core.generate.in_memory import iter_merge_in_memory

    work = iter_merge_in_memory(source.recipe, device=device)  # type: ignore[arg-type]
    try:
        while True:
            progress = next(work)
            yield from _emit(PaneMerging(pane, progress.done, progress.total), clock)
            if cancel.cancelled:
                return None
    except StopIteration as stop:
        return stop.value
    finally:
        work.close()


# ----------------------------------------------------------------------------- validation helpers


def _integer(name: str, value: Any, low: int, high: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeStudioError(f"{name}: expected a whole number, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise MergeStudioError(f"{name}: must be {bound}, got {value}.")


def _number(name: str, value: Any, ok: Callable[[float], bool], want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeStudioError(f"{name}: expected {want}, got {value!r}.")
    if not math.isfinite(value) or not ok(float(value)):
        raise MergeStudioError(f"{name}: expected {want}, got {value!r}.")


def _known_fields(cls, d: dict, what: str) -> dict:
    if not isinstance(d, dict):
        raise MergeStudioError(f"{what}: expected a mapping, got {type(d).__name__}.")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise MergeStudioError(f"{what}: unknown field '{unknown[0]}' (known: {', '.join(sorted(names))}).")
    return dict(d)
