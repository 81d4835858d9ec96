"""Token counts: how a model's tokenizer splits a text, and where its limit cuts it.

* :func:`count_tokens` tokenizes one text with one model's tokenizer (a diffusers
  pipeline with ``tokenizer/`` and ``tokenizer_2/`` gives one result per tokenizer):
  ids, pieces, the character span of every token, which tokens are special, and where
  the model's length limit falls in the text.
* :func:`compare_tokenizers` does that for several models; a model that fails gets a
  result with ``error`` set, so the others still show.
* :func:`token_premium` counts the same sentence (Article 1 of the UDHR, in
  ``resources/parallel/udhr-article1.json``) in many languages and divides by the
  English count: the *tokenization premium* of Petrov, La Malfa, Torr, Bibi, "Language
  Model Tokenizers Introduce Unfairness Between Languages", NeurIPS 2023,
  https://arxiv.org/abs/2305.15425.

Tokenizers load with ``AutoTokenizer.from_pretrained(folder, local_files_only=True)``
and never with ``trust_remote_code``. transformers is imported inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from core.errors import ModelError
from core.resources import resource

ModelRef = Union[str, Path]

# Files any tokenizer folder has at least one of.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# transformers sets model_max_length to int(1e30) when a tokenizer does not know its limit.
SANE_MAX_LENGTH = 10_000_000
# Config keys that hold the number of positions a model can take, in order of preference.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
PARALLEL_FILE = ("parallel", "udhr-article1.json")
REFERENCE_LANGUAGE = "en"


@dataclass
class TokenCount:
    """One text as one tokenizer sees it. Lists have one entry per token, ``[count]``."""

    model: str  # folder path (or label)
    tokenizer: str  # tokenizer class name
    text: str
    count: int = 0  # tokens including special tokens the tokenizer adds
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # convert_ids_to_tokens
    spans: list[Optional[tuple[int, int]]] = field(default_factory=list)  # text[start:end]; None: special
    special: list[bool] = field(default_factory=list)
    chars_per_token: float = 0.0  # len(text) / non-special tokens (0 when there are none)
    unknown: int = 0  # tokens that are the tokenizer's unk token: text it cannot represent
    max_length: Optional[int] = None
    limit_source: str = "unknown"  # where max_length came from
    overflow_token: Optional[int] = None  # index of the first text token truncation drops; None if it fits
    overflow_char: Optional[int] = None  # offset in text where the truncation falls: text[:overflow_char] is kept
    component: Optional[str] = None  # "tokenizer" / "tokenizer_2" in a diffusers pipeline
    error: Optional[str] = None  # set (and the rest empty) when this model could not be counted

    @property
    def content_count(self) -> int:
        """Tokens the text itself produced (special tokens excluded)."""
        return sum(1 for s in self.special if not s)

    @property
    def label(self) -> str:
        """``model`` plus the pipeline component, for a table row."""
        return f"{self.model} [{self.component}]" if self.component else self.model

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spans"] = [list(s) if s is not None else None for s in self.spans]
        data["content_count"] = self.content_count
        return data


# ----------------------------------------------------------------------------- loading


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer_folders(path: Path) -> list[tuple[Optional[str], Path]]:
    """(component, folder) of every tokenizer at ``path``; component is None for a plain folder."""
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder.")
    if not path.is_dir():
        raise ModelError(f"{path}: is a file, not a folder; a single checkpoint file carries no tokenizer.")
    if _has_tokenizer_files(path):
        return [(None, path)]
    found = [
        (sub.name, sub)
        for sub in sorted(path.iterdir())
        if sub.is_dir() and sub.name.startswith("tokenizer") and _has_tokenizer_files(sub)
    ]
    if not found:
        raise ModelError(
            f"{path}: has no tokenizer (no tokenizer.json, tokenizer_config.json, vocab file, "
            "or tokenizer/ subfolder)."
        )
    return found


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelError(f"{folder}: cannot load its tokenizer ({first.strip().rstrip('.')}).") from None


def load_tokenizers(model: ModelRef) -> list[tuple[Optional[str], Any]]:
    """Every tokenizer of a local folder as (component, tokenizer).

    An HF model or tokenizer folder gives ``[(None, tok)]``; a diffusers pipeline gives
    ``[("tokenizer", tok), ("tokenizer_2", tok2)]``. ModelError naming the folder when
    it has none.
    """
    path = Path(model).expanduser()
    return [(component, _load(folder)) for component, folder in _tokenizer_folders(path)]


def load_tokenizer(model: ModelRef, component: Optional[str] = None) -> Any:
    """The tokenizer of a local folder (a pipeline's ``component``, its first by default)."""
    path = Path(model).expanduser()
    folders = _tokenizer_folders(path)
    if component is None:
        return _load(folders[0][1])
    for name, folder in folders:
        if name == component:
            return _load(folder)
    names = ", ".join(str(n) for n, _ in folders)
    raise ModelError(f"{path}: has no tokenizer component '{component}' (it has: {names}).")


# ----------------------------------------------------------------------------- limits


def _config_positions(folder: Path) -> Optional[tuple[int, str]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # a broken config is the model loader's error to report, not ours
    if not isinstance(config, dict):
        return None
    for scope, values in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(values, dict):
            continue
        for key in POSITION_KEYS:
            value = values.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{config_path} {scope}{key}"
    return None


def model_limit(tokenizer: Any, path: Path, component: Optional[str]) -> tuple[Optional[int], str]:
    """(max_length, where it came from): the smaller of the tokenizer's model_max_length
    (when it is a real number) and the model config's position count, else (None, "unknown").

    A tokenizer can claim more than the model has positions for (a GPT-2 tokenizer says
    1024 next to ``n_positions: 256``); the model cannot read past its positions, so the
    config wins then and ``limit_source`` names both. A pipeline's ``tokenizer_2`` is
    paired with ``text_encoder_2``'s config.
    """
    value = getattr(tokenizer, "model_max_length", None)
    from_tokenizer = value if isinstance(value, int) and 0 < value <= SANE_MAX_LENGTH else None
    folder = path if component is None else path / component.replace("tokenizer", "text_encoder", 1)
    found = _config_positions(folder)
    if from_tokenizer is not None and (found is None or from_tokenizer <= found[0]):
        return from_tokenizer, "tokenizer model_max_length"
    if found is not None:
        if from_tokenizer is None:
            return found
        return found[0], f"{found[1]} (fewer than the tokenizer's model_max_length {from_tokenizer})"
    return None, "unknown"


# ----------------------------------------------------------------------------- counting


def tokenize(
    tokenizer: Any,
    text: str,
    *,
    model: str = "",
    component: Optional[str] = None,
    max_length: Optional[int] = None,
    limit_source: str = "unknown",
    add_special_tokens: bool = True,
) -> TokenCount:
    """Tokenize ``text`` with a loaded tokenizer (never truncated) and locate the limit."""
    kwargs = dict(add_special_tokens=add_special_tokens, return_special_tokens_mask=True, verbose=False)
    try:
        enc = tokenizer(text, return_offsets_mapping=True, **kwargs)
        offsets = list(enc["offset_mapping"])
    except NotImplementedError:  # a Python-only tokenizer has no offset mapping
        enc = tokenizer(text, **kwargs)
        offsets = None
    ids = [int(i) for i in enc["input_ids"]]
    special = [bool(m) for m in enc.get("special_tokens_mask", [0] * len(ids))]
    if offsets is None:
        spans: list[Optional[tuple[int, int]]] = [None] * len(ids)
    else:
        spans = [None if sp else (int(a), int(b)) for (a, b), sp in zip(offsets, special)]
    content = sum(1 for s in special if not s)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(1 for i in ids if i == unk_id) if unk_id is not None else 0
    overflow_token = overflow_char = None
    if max_length is not None and len(ids) > max_length:
        overflow_token, overflow_char = _overflow(tokenizer, text, ids, special, spans, max_length,
                                                  add_special_tokens, offsets is not None)
    return TokenCount(
        model=model,
        tokenizer=type(tokenizer).__name__,
        text=text,
        count=len(ids),
        ids=ids,
        pieces=[str(p) for p in tokenizer.convert_ids_to_tokens(ids)],
        spans=spans,
        special=special,
        chars_per_token=len(text) / content if content else 0.0,
        unknown=unknown,
        max_length=max_length,
        limit_source=limit_source,
        overflow_token=overflow_token,
        overflow_char=overflow_char,
        component=component,
    )


def _overflow(tokenizer: Any, text: str, ids: list[int], special: list[bool], spans: list, max_length: int,
              add_special_tokens: bool, has_offsets: bool) -> tuple[int, Optional[int]]:
    """(index in ``ids`` of the first text token the truncation drops, offset of its first character).

    Asked, not assumed: the tokenizer truncates to ``max_length`` itself. Tokenizers that
    re-add their closing special token (CLIP, BERT) keep ``max_length - 2`` text tokens,
    so the first one lost sits before index ``max_length``. The kept text tokens are the
    longest common prefix of the truncated and the full text-token ids.
    """
    kwargs = dict(add_special_tokens=add_special_tokens, return_special_tokens_mask=True, verbose=False)
    cut = tokenizer(text, truncation=True, max_length=max_length, **kwargs)
    cut_ids = [int(i) for i in cut["input_ids"]]
    cut_special = [bool(m) for m in cut.get("special_tokens_mask", [0] * len(cut_ids))]
    kept_text = [i for i, sp in zip(cut_ids, cut_special) if not sp]
    text_index = [k for k, sp in enumerate(special) if not sp]  # positions of text tokens in ``ids``
    kept = 0
    while kept < min(len(kept_text), len(text_index)) and kept_text[kept] == ids[text_index[kept]]:
        kept += 1
    if kept == len(text_index):  # only special tokens were cut: every character is kept
        return max_length, len(text) if has_offsets else None
    first_lost = text_index[kept]
    span = spans[first_lost]
    return first_lost, span[0] if span is not None else None


def count_tokens(
    model: ModelRef, text: str, *, add_special_tokens: bool = True
) -> Union[TokenCount, list[TokenCount]]:
    """Count the tokens of ``text`` for the model at ``model`` (a local folder).

    Returns one :class:`TokenCount`, or a list of them (one per tokenizer) for a
    pipeline with several tokenizers; a pipeline's results have ``component`` set.
    When the text is longer than ``max_length``, ``overflow_token`` is the index, in the
    untruncated sequence, of the first text token that truncating to ``max_length``
    drops, and ``overflow_char`` the offset where that token starts: ``text[:overflow_char]``
    is the text the model reads. A tokenizer that re-adds its closing special token when
    truncating (CLIP, BERT) keeps ``max_length - 2`` text tokens, so for them
    ``overflow_token`` is ``max_length - 1``.
    """
    path = Path(model).expanduser()
    results = []
    for component, tok in load_tokenizers(path):
        limit, source = model_limit(tok, path, component)
        results.append(
            tokenize(tok, text, model=str(model), component=component, max_length=limit,
                     limit_source=source, add_special_tokens=add_special_tokens)
        )
    return results[0] if len(results) == 1 else results


def _as_list(result: Union[TokenCount, list[TokenCount]]) -> list[TokenCount]:
    return result if isinstance(result, list) else [result]


def compare_tokenizers(models: list[ModelRef], text: str) -> list[TokenCount]:
    """:func:`count_tokens` for each model, flattened; a failing model gives a result
    with ``error`` (one sentence naming its folder) and empty lists, and the rest go on."""
    out: list[TokenCount] = []
    for model in models:
        try:
            out.extend(_as_list(count_tokens(model, text)))
        except ModelError as exc:
            out.append(TokenCount(model=str(model), tokenizer="", text=text, error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a tokenizer that breaks on this text fails its own row only
            out.append(TokenCount(model=str(model), tokenizer="", text=text, error=_failure(model, exc)))
    return out


def _failure(model: ModelRef, exc: BaseException) -> str:
    """One sentence naming the folder and the exception (type and first line), no traceback."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "").strip().rstrip(".")
    reason = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    return f"{Path(model).expanduser()}: its tokenizer failed on the text ({reason})."


# ----------------------------------------------------------------------------- languages


def parallel_texts() -> dict[str, dict[str, str]]:
    """UDHR Article 1 by language code: ``{"fr": {"language", "script", "text"}}``."""
    path = resource(*PARALLEL_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        texts = data["texts"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: cannot read the parallel texts ({exc}).") from None
    return {code: dict(entry) for code, entry in texts.items()}


def token_premium(models: list[ModelRef], languages: Optional[list[str]] = None) -> dict[str, Any]:
    """Tokens each model needs for UDHR Article 1 per language, relative to English.

    ``premium[lang] = count[lang] / count["en"]`` (Petrov et al. 2023). Counts exclude
    special tokens (the text is tokenized with ``add_special_tokens=False``), so a
    tokenizer's BOS/EOS does not shrink the premiums of long texts. English is always
    counted. Returns::

        {"reference": "en", "languages": [codes],
         "models": [{"model", "component", "tokenizer", "counts": {code: int},
                     "premium": {code: float}, "unknown": {code: int},
                     "error": str | None}]}

    ``unknown`` counts unk tokens: a low premium made of unk tokens (a WordPiece
    vocabulary without Thai, say) means the text was lost, not tokenized cheaply.
    A model whose tokenizer cannot be loaded, or breaks on one of the texts, gets an entry
    with ``error`` set; the other models go on.
    """
    texts = parallel_texts()
    codes = list(texts) if languages is None else list(dict.fromkeys(languages))
    missing = [c for c in codes if c not in texts]
    if missing:
        raise ModelError(
            f"{resource(*PARALLEL_FILE)}: has no text for language '{missing[0]}' "
            f"(it has: {', '.join(texts)})."
        )
    if REFERENCE_LANGUAGE not in codes:
        codes.insert(0, REFERENCE_LANGUAGE)
    rows: list[dict[str, Any]] = []
    for model in models:
        try:
            loaded = load_tokenizers(model)
        except ModelError as exc:
            rows.append({"model": str(model), "component": None, "tokenizer": "", "counts": {},
                         "premium": {}, "unknown": {}, "error": str(exc)})
            continue
        for component, tok in loaded:
            try:
                results = {code: tokenize(tok, texts[code]["text"], add_special_tokens=False) for code in codes}
            except Exception as exc:  # noqa: BLE001 - a tokenizer that breaks on a language fails its own row only
                rows.append({"model": str(model), "component": component, "tokenizer": type(tok).__name__,
                             "counts": {}, "premium": {}, "unknown": {}, "error": _failure(model, exc)})
                continue
            counts = {code: r.content_count for code, r in results.items()}
            english = counts[REFERENCE_LANGUAGE]  # > 0: the English sentence is never empty
            premium = {code: n / english for code, n in counts.items()}
            rows.append({"model": str(model), "component": component, "tokenizer": type(tok).__name__,
                         "counts": counts, "premium": premium,
                         "unknown": {code: r.unknown for code, r in results.items()}, "error": None})
    return {"reference": REFERENCE_LANGUAGE, "languages": codes, "models": rows}
