"""A small demo family for the first run: built locally in seconds, nothing downloaded.

Three tiny Llama-style causal language models with random weights: a base and
two "fine-tune-like" variants (the base plus, for every 2-D weight, a low-rank
delta and a little noise, deterministic from a fixed seed), so that every merge
method has something meaningful to work on. Each folder holds config.json,
model.safetensors (bfloat16, like a real release), generation_config.json, a
working byte-level BPE tokenizer and a README.md saying what it is; each loads
offline with ``AutoModelForCausalLM`` and ``AutoTokenizer``.

Each model is written into a hidden temporary folder beside its target and
renamed at the end; a complete family already on disk is reused.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.errors import MergeStudioError
from core.jobs import Progress, drive
from core.paths import home

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEMO_NAMES = ("demo-base", "demo-chat", "demo-code")
SEED = 1234
DEMO_METADATA_KEY = "mergestudio_demo"
FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, MAX_POSITIONS = 4, 64, 128, 4, 2, 512, 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
DELTA_RANK, DELTA_SCALE, NOISE_SCALE = 4, 0.05, 0.01

DESCRIPTIONS = {
    "demo-base": "the base model of the family",
    "demo-chat": "a fine-tune-like variant of demo-base (a low-rank change to every weight matrix)",
    "demo-code": "another fine-tune-like variant of demo-base, with a different change",
}

# The tokenizer is trained on this text when the family is built (a few milliseconds).
_TEXT = """\
The quick brown fox jumps over the lazy dog. A model is a set of weights that turns words into
numbers and back into words. Merging models means mixing their weights so that one model can do what
several did before. This is a small demo model with random weights, so what it writes makes no sense,
but it loads, it runs, and it can be merged with the other models of the same family.
Hello world! How are you today? I am fine, thank you. What time is it? It is late in the evening.
We write code, we read books, we cook dinner and we walk the dog in the park near the river.
Every morning the little shop on the corner opens its doors at seven, and the baker puts fresh bread
in the window. People stop on their way to work, buy a loaf or a cake, and talk about the weather.
When it rains they stay a little longer, drinking coffee and reading the newspaper at the long table.
Children come after school to spend their coins on sweets, and the old man from the house next door
always asks for the same thing: two rolls, one apple pie and a small bottle of milk.
In the spring the garden behind the shop is full of flowers, birds sing in the trees, and the cat
sleeps in the sun on the wall. In the summer there are tourists with maps and cameras, asking for
directions to the castle, the museum or the beach. In the autumn the leaves turn yellow, red and brown.
In the winter it snows, the streets are quiet, and the windows shine with warm light until late at night.
Numbers help too: one, two, three, four, five, six, seven, eight, nine, ten, a hundred, a thousand.
Questions are welcome. Why is the sky blue? Where does the wind come from? Which way is north?
def main(): print("hello, world") # a line of code, so that the code model has something to say
"""


def default_demo_dir() -> Path:
    """Where the demo family lives unless told otherwise."""
    return home() / "demo-models"


def make_demo_family(root: Optional[str | Path] = None) -> list[Path]:
    """Build (or reuse) the demo family under ``root``; return the three model folders."""
    return drive(iter_make_demo_family(None if root is None else Path(root)))


def iter_make_demo_family(root: Optional[Path] = None) -> Generator[Progress, None, list[Path]]:
    """The same as a generator: yields Progress after each model; closing it stops cleanly."""
    root = Path(root).expanduser().absolute() if root is not None else default_demo_dir()
    targets = [root / name for name in DEMO_NAMES]
    started = time.monotonic()
    total = len(DEMO_NAMES)
    if all(_is_complete(t) for t in targets):
        yield Progress(total, total, elapsed_s=time.monotonic() - started, message="reused the demo family")
        return targets
    for target in targets:
        if target.exists() and not _is_complete(target):
            raise MergeStudioError(
                f"{target}: exists but is not a complete Merge Studio demo model; remove it or choose another folder."
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeStudioError(f"{root}: cannot create the demo folder ({exc.strerror or exc}).") from None

    base_state: Optional[dict[str, "torch.Tensor"]] = None
    for done, (name, target) in enumerate(zip(DEMO_NAMES, targets), 1):
        if _is_complete(target):
            message = f"reused {name}"
        else:
            if base_state is None:
                base_state = _base_state(targets[0])
            state = base_state if name == DEMO_NAMES[0] else _variant(base_state, name)
            _write_model(target, name, state)
            message = f"built {name}"
        yield Progress(done, total, elapsed_s=time.monotonic() - started, message=message)
    return targets


def iter_make_demo_family_in_child(root: Optional[Path] = None) -> Generator[Progress, None, list[Path]]:
    """Build the demo family in a child process (``mergestudio models demo --json``).

    The app uses this so that its own process never loads torch (the window
    stays light and its GUI thread is never held by a torch import).
    """
    import json
    import os
    import subprocess
    import sys

    root = Path(root).expanduser().absolute() if root is not None else default_demo_dir()
    targets = [root / name for name in DEMO_NAMES]
    if all(_is_complete(t) for t in targets):
        yield Progress(len(targets), len(targets), message="reused the demo family")
        return targets
    yield Progress(0, 1, message="building a tiny base model and two fine-tune-like variants…")
    if getattr(sys, "frozen", False):
        command = [sys.executable, "models", "demo", str(root), "--json"]
    else:
        command = [sys.executable, "-m", "core.cli", "models", "demo", str(root), "--json"]
    project = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise MergeStudioError(f"Cannot start the process that builds the demo models ({exc.strerror or exc}).") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        detail = lines[-1].removeprefix("mergestudio: error: ") if lines else f"exit status {proc.returncode}"
        raise MergeStudioError(f"The demo models were not built: {detail}")
    try:
        paths = [Path(p) for p in json.loads(proc.stdout)["models"]]
    except (ValueError, KeyError, TypeError):
        raise MergeStudioError("The demo builder's output could not be read.") from None
    yield Progress(1, 1, message="built the demo family")
    return paths


# ----------------------------------------------------------------------------- checking


def _is_complete(folder: Path) -> bool:
    """Every file present and the weights' header marks them as this demo model."""
    from core.io.tensors import read_header

    if not folder.is_dir() or not all((folder / f).is_file() for f in FILES):
        return False
    try:
        header = read_header(folder / "model.safetensors")
    except MergeStudioError:
        return False
    return header.metadata.get(DEMO_METADATA_KEY) == folder.name


# ----------------------------------------------------------------------------- weights


def _generator(*parts: object) -> "torch.Generator":
    import torch

    gen = torch.Generator()
    gen.manual_seed(zlib.crc32(":".join(map(str, (SEED,) + parts)).encode()))
    return gen


def _shapes() -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _base_state(existing: Path) -> dict[str, "torch.Tensor"]:
    """The base's weights: read back when demo-base is already complete, else random (float32)."""
    import torch

    if _is_complete(existing):
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(existing / "model.safetensors").items()}
    state = {}
    for name, shape in _shapes().items():
        if len(shape) == 1:
            state[name] = torch.ones(shape)  # RMSNorm weights start at one
        else:
            state[name] = torch.randn(shape, generator=_generator("base", name)) / shape[1] ** 0.5
    # Rounded as stored, so a variant is the same whether the base was just built or read back.
    return {k: v.to(torch.bfloat16).float() for k, v in state.items()}


def _variant(base: dict[str, "torch.Tensor"], variant: str) -> dict[str, "torch.Tensor"]:
    """base + a rank-DELTA_RANK delta and small noise on every 2-D weight (norms unchanged)."""
    import torch

    out = {}
    for name, w in base.items():
        if w.dim() != 2:
            out[name] = w.clone()
            continue
        gen = _generator(variant, name)
        scale = float(w.std())
        u = torch.randn(w.shape[0], DELTA_RANK, generator=gen)
        v = torch.randn(DELTA_RANK, w.shape[1], generator=gen)
        delta = DELTA_SCALE * scale * (u @ v) / DELTA_RANK**0.5
        noise = NOISE_SCALE * scale * torch.randn(w.shape, generator=gen)
        out[name] = w + delta + noise
    return out


# ----------------------------------------------------------------------------- writing


def _write_model(target: Path, name: str, state: dict[str, "torch.Tensor"]) -> None:
    """Write one model atomically: a hidden temporary folder beside ``target``, renamed at the end."""
    import torch

    from core.io.writer import AtomicOutput, OutputTensor, ShardedWriter, plan_shards

    # The project's writer lays the header out in the order given (safetensors' own writer
    # orders metadata keys differently from run to run), so a rebuild is byte-identical.
    tensors = {k: state[k].to(torch.bfloat16).contiguous() for k in _shapes()}
    layout = [OutputTensor(k, tuple(v.shape), "BF16") for k, v in tensors.items()]
    metadata = {"format": "pt", DEMO_METADATA_KEY: name}
    try:
        with AtomicOutput(target) as tmp:
            writer = ShardedWriter(tmp, plan_shards(layout, sum(t.nbytes for t in layout), metadata))
            try:
                for key, tensor in tensors.items():
                    writer.write(key, tensor)
                writer.finish()
            finally:
                writer.abort()
            _write_json(tmp / "config.json", _config())
            _write_json(tmp / "generation_config.json", _generation_config())
            _write_tokenizer(tmp)
            (tmp / "README.md").write_text(_model_card(name), encoding="utf-8")
            tmp.chmod(0o755)  # the temporary folder is private; the model is an ordinary folder
    except OSError as exc:
        raise MergeStudioError(f"{target}: cannot write the demo model ({exc.strerror or exc}).") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _generation_config() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "max_new_tokens": 32}


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (VOCAB entries) trained on the built-in text; no unknown inputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB:  # never expected: the trainer stops at vocab_size
        raise MergeStudioError(f"{folder}: the demo tokenizer has more than {VOCAB} tokens.")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
        },
    )


def _model_card(name: str) -> str:
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags:",
        "- mergestudio-demo",
        "- random-weights",
        "---",
        "",
        f"# {name}",
        "",
        f"A random demo model made by Merge Studio on this computer: {DESCRIPTIONS[name]}.",
        "",
        f"It is a tiny Llama-style causal language model ({LAYERS} layers, hidden size {HIDDEN}, "
        f"{HEADS} attention heads, {KV_HEADS} key-value heads, {VOCAB} tokens) with **random weights**: "
        "it loads and generates, but what it writes means nothing. It exists so that merging, "
        "inspecting and comparing can be tried at once, without downloading anything.",
        "",
        f"The family: {', '.join(DEMO_NAMES)}. Nothing in it was trained.",
        "",
    ])
