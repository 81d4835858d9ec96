"""Side-by-side text generation and in-memory merges (core.generate.text, core.generate.in_memory)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import core.merge as merge
from core.errors import MergeStudioError
from core.generate import in_memory, text
from core.generate.text import (
    PaneFinished,
    PaneMerging,
    PaneStarted,
    PaneToken,
    StreamDecoder,
    TextSettings,
    TextSource,
    compare_text,
    iter_compare_text,
    process_logits,
)
from core.jobs import CancelToken
from tests.fixtures.tiny_models import make_base, read_state_dict

PROMPT = "hello the cat and the dog"
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=12)


def linear(a: Path, b: Path, wa: float = 0.3, wb: float = 0.7) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": wa}}, {"model": str(b), "parameters": {"weight": wb}}],
    }


def run(sources, settings):
    """compare_text with every event recorded (and the consumer never left in inference mode)."""
    events: list = []

    def record(event):
        assert not torch.is_inference_mode_enabled()
        events.append(event)

    results = compare_text(sources, settings, on_event=record)
    return results, events


def pieces(events, pane: int) -> list[str]:
    return [e.text for e in events if isinstance(e, PaneToken) and e.pane == pane]


@pytest.fixture(scope="module")
def hf(llama_family):
    """transformers' own model and tokenizer for llama 'a' (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_family["a"])).eval()
    return model, AutoTokenizer.from_pretrained(str(llama_family["a"]))


def hf_generate(hf, prompt: str, **kwargs) -> list[int]:
    model, tok = hf
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id, **kwargs)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def no_tokenizer(llama_family, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("notok") / "llama-no-tokenizer"
    shutil.copytree(llama_family["base"], dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


# ----------------------------------------------------------------------------- decoding matches transformers


def test_greedy_with_repetition_penalty_matches_transformers_generate(llama_family, hf):
    settings = TextSettings(PROMPT, max_new_tokens=12, repetition_penalty=1.3)
    results, events = run([TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))], settings)
    ref = hf_generate(hf, PROMPT, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    assert results[0].token_ids == ref
    assert len(set(ref)) > 3  # the penalty makes the tiny model say more than one word
    assert results[0].text == hf[1].decode(ref, skip_special_tokens=True)
    assert results[0].status == "done" and results[0].finish_reason in ("length", "eos")
    assert results[0].prompt_tokens == len(hf[1](PROMPT)["input_ids"])


def test_seeded_sampling_matches_transformers_generate(llama_family, hf):
    settings = TextSettings(PROMPT, seed=7, **SAMPLING)
    results, _ = run([TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))], settings)
    torch.manual_seed(7)  # transformers samples from the global generator; ours is its own, seeded the same
    ref = hf_generate(hf, PROMPT, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=12)
    assert results[0].token_ids == ref


def test_same_seed_same_text_identical_models_identical_panes(llama_family):
    settings = TextSettings(PROMPT, seed=3, temperature=1.0, max_new_tokens=16)
    sources = [
        TextSource("a", str(llama_family["a"])),
        TextSource("a again", str(llama_family["a"])),
        TextSource("b", str(llama_family["b"])),
    ]
    first, _ = run(sources, settings)
    second, _ = run(sources, settings)
    assert first[0].text == first[1].text and first[0].token_ids == first[1].token_ids
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    other, _ = run(sources[:2], TextSettings(PROMPT, seed=4, temperature=1.0, max_new_tokens=16))
    assert other[0].token_ids != first[0].token_ids
    assert all(r.new_tokens == len(r.token_ids) for r in first)


def test_events_order_and_streamed_pieces_add_up(llama_family):
    settings = TextSettings(PROMPT, seed=1, temperature=1.0, max_new_tokens=10)
    results, events = run([TextSource("a", str(llama_family["a"])), TextSource("c", str(llama_family["c"]))], settings)
    kinds = [(type(e).__name__, e.pane) for e in events]
    assert kinds[0] == ("PaneStarted", 0) and kinds[-1] == ("PaneFinished", 1)
    assert kinds.index(("PaneFinished", 0)) < kinds.index(("PaneStarted", 1))
    for pane, result in enumerate(results):
        got = pieces(events, pane)
        assert "".join(got) == result.text
        assert [e.index for e in events if isinstance(e, PaneToken) and e.pane == pane] == sorted(
            e.index for e in events if isinstance(e, PaneToken) and e.pane == pane
        )
        finished = [e for e in events if isinstance(e, PaneFinished) and e.pane == pane]
        assert finished[0].result is result
        assert result.memory_kind == text.RSS_MEMORY and result.peak_memory_bytes is not None
        assert result.total_s >= (result.load_s or 0) > 0
        assert result.ttft_s is not None and result.ttft_s > 0
        if result.new_tokens >= 2:
            assert result.tokens_per_s is not None and result.tokens_per_s > 0
    json.dumps([r.to_json() for r in results])  # storable as it is


# ----------------------------------------------------------------------------- pure pieces


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stream_decoder_keeps_multibyte_characters_whole():
    tok = byte_level_tokenizer()
    phrase = "héllo 🙂 wörld ✓"
    ids = tok(phrase)["input_ids"]
    assert len(ids) == len(phrase.encode("utf-8"))
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # why per-id decoding is wrong
    decoder = StreamDecoder(tok)
    out = [decoder.push(i) for i in ids]
    out.append(decoder.flush())
    assert "".join(out) == phrase
    assert not any("\ufffd" in p for p in out)
    assert out[ids.index(tok("🙂")["input_ids"][0]) : ][:3] == ["", "", ""]  # held until the emoji is whole


def test_stream_decoder_keeps_the_spaces_between_words(llama_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_family["a"]))
    ids = tok("the cat and the dog , hello")["input_ids"]
    decoder = StreamDecoder(tok)
    out = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(out) == tok.decode(ids)
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)  # per-id decoding loses the spaces


def test_process_logits_against_the_formulas():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, generator=gen) * 3
    seen = torch.tensor([1, 5, 5, 9])
    # Repetition penalty alone (greedy): positive logits divided, negative multiplied, once per id.
    greedy = TextSettings("x", repetition_penalty=1.5)
    got = process_logits(logits.clone(), seen, greedy)
    want = logits.clone()
    for i in {1, 5, 9}:
        want[i] = logits[i] / 1.5 if logits[i] > 0 else logits[i] * 1.5
    assert torch.equal(got, want)
    # Temperature and top-k: the k largest survive, scaled.
    got = process_logits(logits.clone(), seen[:0], TextSettings("x", temperature=0.5, top_k=7))
    top = set(torch.argsort(logits, descending=True)[:7].tolist())
    assert {i for i in range(40) if math.isfinite(got[i])} == top
    assert torch.allclose(got[list(top)], logits[list(top)] / 0.5)
    # Top-p: the smallest most-likely set whose probability reaches p.
    for p in (0.05, 0.5, 0.9, 0.999):
        got = process_logits(logits.clone(), seen[:0], TextSettings("x", temperature=1.0, top_p=p))
        probs = logits.softmax(-1)
        keep, total = set(), 0.0
        for i in torch.argsort(logits, descending=True).tolist():
            keep.add(i)
            total += float(probs[i])
            if total >= p:
                break
        assert {i for i in range(40) if math.isfinite(got[i])} == keep


# ----------------------------------------------------------------------------- stop, failures, notes


def test_cancel_stops_between_tokens_and_later_panes_do_not_start(llama_family):
    cancel = CancelToken()
    settings = TextSettings(PROMPT, seed=2, temperature=1.0, max_new_tokens=30)
    work = iter_compare_text(
        [TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))], settings, cancel=cancel
    )
    events = []
    try:
        while True:
            event = next(work)
            events.append(event)
            if isinstance(event, PaneToken) and len(pieces(events, 0)) == 3:
                cancel.cancel()
    except StopIteration as stop:
        results = stop.value
    first, second = results
    assert first.status == "stopped" and first.finish_reason == "stopped"
    assert len(pieces(events, 0)) == 3 and "".join(pieces(events, 0)) == first.text
    assert 3 <= first.new_tokens < 30
    assert second.status == "stopped" and second.new_tokens == 0
    assert not any(isinstance(e, PaneStarted) and e.pane == 1 for e in events)
    assert isinstance(events[-1], PaneFinished) and events[-1].result is second


def test_bad_panes_fail_with_one_sentence_and_others_go_on(llama_family, bert_family, no_tokenizer):
    settings = TextSettings(PROMPT, max_new_tokens=4)
    sources = [
        TextSource("no tokenizer", str(no_tokenizer)),
        TextSource("bert", str(bert_family["base"])),
        TextSource("missing", str(llama_family["a"].parent / "nowhere")),
        TextSource("good", str(llama_family["a"])),
    ]
    results, events = run(sources, settings)
    assert [r.status for r in results] == ["failed", "failed", "failed", "done"]
    assert str(no_tokenizer) in results[0].error and "tokenizer" in results[0].error
    assert str(bert_family["base"]) in results[1].error and "not a causal language model" in results[1].error
    assert "nowhere" in results[2].error
    for r in results[:3]:
        assert r.error.count("\n") == 0 and r.error.endswith(".") and r.text == ""
    assert results[3].new_tokens == 4 and results[3].finish_reason == "length"


def test_prompt_too_long_for_the_model_fails_the_pane(llama_family):
    long_prompt = " ".join(["cat"] * 130)  # the tiny llama has 128 positions
    results, _ = run(
        [TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))],
        TextSettings(long_prompt, max_new_tokens=4),
    )
    assert all(r.status == "failed" for r in results)
    assert str(llama_family["a"]) in results[0].error and "130 tokens" in results[0].error
    results, _ = run(
        [TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))],
        TextSettings(PROMPT, max_new_tokens=125),
    )
    assert all(r.status == "failed" and "max_new_tokens" in r.error for r in results)


def test_out_of_memory_fails_only_that_pane(llama_family, monkeypatch):
    real = text._load_model

    def load(source, config, where, device, merged=None):
        if source.label == "big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(source, config, where, device, merged)

    monkeypatch.setattr(text, "_load_model", load)
    results, _ = run(
        [TextSource("big", str(llama_family["a"])), TextSource("small", str(llama_family["b"]))],
        TextSettings(PROMPT, max_new_tokens=3),
    )
    assert results[0].status == "failed" and "ran out of memory" in results[0].error
    assert str(llama_family["a"]) in results[0].error
    assert results[1].status == "done" and results[1].new_tokens == 3


def test_each_pane_frees_its_model_before_the_next_loads(llama_family, monkeypatch):
    import weakref

    real, loaded = text._load_model, []

    def load(*args, **kwargs):
        assert all(ref() is None for ref in loaded), "a previous pane's model is still alive"
        model = real(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(text, "_load_model", load)
    sources = [TextSource(k, str(llama_family[k])) for k in ("a", "b", "c")]
    results, _ = run(sources, TextSettings(PROMPT, max_new_tokens=3))
    assert [r.status for r in results] == ["done"] * 3 and len(loaded) == 3
    assert all(ref() is None for ref in loaded)


def test_different_tokenizers_are_noted(llama_family, tmp_path):
    other = make_base(tmp_path / "llama-vocab-300", arch="llama", vocab=300)
    settings = TextSettings(PROMPT, max_new_tokens=3)
    results, _ = run([TextSource("a", str(llama_family["a"])), TextSource("other", str(other))], settings)
    assert all(r.status == "done" for r in results)
    assert all(any("different tokenizers" in n for n in r.notes) for r in results)
    same, _ = run([TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))], settings)
    assert not any("different tokenizers" in n for r in same for n in r.notes)


def test_chat_template_wraps_the_prompt_or_says_there_is_none(llama_family, tmp_path):
    from transformers import AutoTokenizer

    chat = tmp_path / "llama-chat"
    shutil.copytree(llama_family["a"], chat)
    cfg_file = chat / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} said the man{% endfor %}"
    cfg_file.write_text(json.dumps(cfg))
    settings = TextSettings("hello", max_new_tokens=2, chat_template=True)
    results, _ = run([TextSource("chat", str(chat)), TextSource("plain", str(llama_family["a"]))], settings)
    tok = AutoTokenizer.from_pretrained(str(llama_family["a"]))
    assert results[0].prompt_tokens == len(tok("hello said the man")["input_ids"])
    assert results[1].prompt_tokens == len(tok("hello")["input_ids"])
    assert any("no chat template" in n for n in results[1].notes)


def test_sources_and_settings_are_checked_up_front(llama_family):
    a = TextSource("a", str(llama_family["a"]))
    settings = TextSettings(PROMPT)
    with pytest.raises(MergeStudioError, match="2 to 4"):
        iter_compare_text([a], settings)
    with pytest.raises(MergeStudioError, match="2 to 4"):
        iter_compare_text([a] * 5, settings)
    with pytest.raises(MergeStudioError, match="exactly one of model or recipe"):
        iter_compare_text([a, TextSource("both", model="x", recipe="y.yaml")], settings)
    for field, value in [("top_p", 0.0), ("temperature", -1.0), ("max_new_tokens", 0), ("top_k", -1),
                         ("repetition_penalty", float("nan")), ("seed", -3)]:
        with pytest.raises(MergeStudioError, match=field):
            iter_compare_text([a, a], TextSettings(PROMPT, **{field: value}))
    s = TextSettings("hi", seed=5, temperature=0.7, top_p=0.8, top_k=3, repetition_penalty=1.1, chat_template=True)
    assert TextSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(MergeStudioError, match="unknown field 'temp'"):
        TextSettings.from_json({"prompt": "x", "temp": 1})


# ----------------------------------------------------------------------------- in-memory merges


@pytest.fixture(scope="module")
def disk_merge(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("inmem")
    recipe = root / "linear.yaml"
    recipe.write_text(yaml.safe_dump(linear(llama_family["a"], llama_family["b"])))
    merge.run(recipe, root / "merged", device="cpu")
    return recipe, root / "merged"


def test_merge_in_memory_equals_the_merge_written_to_disk(llama_family, disk_merge):
    recipe, written = disk_merge
    want = read_state_dict(written)
    for given in (recipe, linear(llama_family["a"], llama_family["b"])):
        state, folder = in_memory.merge_in_memory(given)
        assert folder == llama_family["a"]
        assert set(state) == set(want)
        for name, tensor in want.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    a, b = read_state_dict(llama_family["a"]), read_state_dict(llama_family["b"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(state[name], 0.3 * a[name] + 0.7 * b[name], atol=1e-6)  # the formula, too


def test_recipe_pane_generates_what_the_written_merge_generates(disk_merge):
    recipe, written = disk_merge
    settings = TextSettings(PROMPT, seed=11, **SAMPLING)
    results, events = run([TextSource("in memory", recipe=str(recipe)), TextSource("on disk", str(written))], settings)
    mem, disk = results
    assert mem.status == disk.status == "done"
    assert mem.token_ids == disk.token_ids and mem.text == disk.text
    assert mem.model is None and any("Merged in memory" in n and " MB)" in n for n in mem.notes)  # not "0.00 GB"
    merging = [e for e in events if isinstance(e, PaneMerging)]
    assert merging and merging[-1].done == merging[-1].total and all(e.pane == 0 for e in merging)


def test_in_memory_merge_is_refused_when_it_does_not_fit(llama_family, disk_merge, monkeypatch):
    recipe, _ = disk_merge
    with pytest.raises(MergeStudioError, match="max_bytes") as info:
        in_memory.merge_in_memory(recipe, max_bytes=1000)
    assert str(recipe) in str(info.value)
    monkeypatch.setattr(in_memory, "available_memory", lambda: 4096)
    with pytest.raises(MergeStudioError, match="available"):
        in_memory.merge_in_memory(recipe)
    # In a comparison the refusal is that pane's failure.
    results, _ = run([TextSource("mem", recipe=str(recipe)), TextSource("a", str(llama_family["a"]))],
                     TextSettings(PROMPT, max_new_tokens=2))
    assert results[0].status == "failed" and "available" in results[0].error
    assert results[1].status == "done"


# ----------------------------------------------------------------------------- review fixes


def _n_prompt(folder: Path, prompt: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder))(prompt)["input_ids"])


def test_positions_check_counts_the_last_token_as_never_fed_back(gpt2_family, monkeypatch):
    """GPT-2's learned position table has n_positions rows: feeding one more position would fail.

    The model reads the prompt and every new token but the last: n_prompt + max_new_tokens - 1.
    """
    folder = gpt2_family["a"]
    limit = json.loads((folder / "config.json").read_text())["n_positions"]
    monkeypatch.setattr(text, "_eos_ids", lambda model, tok: set())  # always run to max_new_tokens
    words = " ".join(["cat"] * (limit - 30))
    n = _n_prompt(folder, words)
    assert n < limit
    fits = limit - n + 1
    sources = [TextSource("a", str(folder)), TextSource("b", str(gpt2_family["b"]))]
    results, _ = run(sources, TextSettings(words, max_new_tokens=fits))
    assert [r.status for r in results] == ["done", "done"]
    assert results[0].new_tokens == fits and results[0].finish_reason == "length"
    results, _ = run(sources, TextSettings(words, max_new_tokens=fits + 1))
    assert results[0].status == "failed"
    assert results[0].error == (
        f"{folder}: the prompt ({n} tokens) plus max_new_tokens={fits + 1} needs {limit + 1} of the model's "
        f"{limit} positions; lower max_new_tokens to {fits} or less."
    )
    # A prompt of exactly the model's positions still gives one token; one more is too long.
    exact = " ".join(["cat"] * (limit - 30 + limit - n))
    assert _n_prompt(folder, exact) == limit
    results, _ = run(sources, TextSettings(exact, max_new_tokens=1))
    assert results[0].status == "done" and results[0].new_tokens == 1
    over = exact + " cat"
    results, _ = run(sources, TextSettings(over, max_new_tokens=1))
    assert results[0].status == "failed"
    assert results[0].error == f"{folder}: the prompt is {limit + 1} tokens, more than the model's {limit} positions."


@pytest.mark.parametrize("when", ["at PaneStarted", "during the load"])
def test_stop_pressed_while_the_model_loads_runs_no_forward(llama_family, monkeypatch, when):
    real, calls = text._load_model, []

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda *a: calls.append(1))
        if when == "during the load":
            cancel.cancel()  # the GUI thread sets it while the weights are read
        return model

    monkeypatch.setattr(text, "_load_model", load)
    cancel = CancelToken()
    sources = [TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))]
    events = []

    def record(event):
        events.append(event)
        if isinstance(event, PaneStarted) and when == "at PaneStarted":
            cancel.cancel()  # Stop, while pane 0 is about to load

    first, second = compare_text(sources, TextSettings(PROMPT, max_new_tokens=5), cancel=cancel, on_event=record)
    assert calls == []
    assert first.status == "stopped" and first.finish_reason == "stopped" and first.error is None
    assert first.new_tokens == 0 and first.token_ids == [] and first.text == ""
    assert first.load_s is not None
    assert not any(isinstance(e, PaneToken) for e in events)
    assert second.status == "stopped" and second.new_tokens == 0


def test_a_tokenizer_error_fails_its_own_pane_only(llama_family, monkeypatch):
    real = text._load_tokenizer

    class Broken:
        """The real tokenizer, whose __call__ raises what a fast tokenizer raises on odd input."""

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *args, **kwargs):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple]\nsecond line")

    def load(folder, where):
        tok = real(folder, where)
        return Broken(tok) if Path(folder) == llama_family["a"] else tok

    monkeypatch.setattr(text, "_load_tokenizer", load)
    results, _ = run(
        [TextSource("a", str(llama_family["a"])), TextSource("b", str(llama_family["b"]))],
        TextSettings(PROMPT, max_new_tokens=3),
    )
    assert results[0].status == "failed"
    assert results[0].error == (
        f"{llama_family['a']}: its tokenizer failed on the prompt "
        "(TypeError: TextEncodeInput must be Union[TextInputSequence, Tuple])."
    )
    assert results[1].status == "done" and results[1].new_tokens == 3


def test_a_recipe_that_breaks_the_planner_fails_its_own_pane_only(llama_family, monkeypatch):
    import core.merge.plan as plan

    def broken(recipe, *a, **kw):
        raise KeyError("models")

    monkeypatch.setattr(plan, "plan_merge", broken)
    results, _ = run(
        [TextSource("merge", recipe=linear(llama_family["a"], llama_family["b"])),
         TextSource("b", str(llama_family["b"]))],
        TextSettings(PROMPT, max_new_tokens=3),
    )
    assert results[0].status == "failed"
    assert results[0].error == "The recipe: cannot be planned as a merge (KeyError: 'models')."
    assert results[1].status == "done" and results[1].new_tokens == 3


def test_pane_labels_are_made_unique():
    from core.generate import unique_label

    taken: set[str] = set()
    assert [unique_label(n, taken) for n in ("a", "a", "b", "a")] == ["a", "a (2)", "b", "a (3)"]
