"""Token merging for diffusers UNets: ``method="tomesd"`` and ``method="todo"``.

Two methods for Stable Diffusion 1.x/2.x and SDXL UNets (diffusers'
``UNet2DConditionModel``, or any pipeline with a ``.unet``), re-implemented from the
papers and from reading the installed ``tomesd`` package (MIT licence); no code was
copied:

* **tomesd** -- Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPR
  Workshops 2023, https://arxiv.org/abs/2303.17604 (reference implementation: the
  ``tomesd`` package, ``tomesd.apply_patch``). In every transformer block whose
  latent resolution is at most ``max_downsample`` times coarser than the latent, the
  block input ``x [B, N, C]`` (the metric) is split into *destination* tokens -- one
  per ``sx`` x ``sy`` cell of the token grid (the top-left one, or a random one with
  ``use_rand``) -- and *source* tokens (all the others, including those outside the
  last full row/column of cells). Each source is matched to its most similar
  destination (cosine similarity), and the ``r = int(ratio * N)`` best-matched sources
  are averaged into their destination (plain mean of the destination and its sources,
  no size weighting). The self-attention (``merge_attn``), cross-attention
  (``merge_crossattn``) and feed-forward (``merge_mlp``) branches then run on the
  ``N - r`` merged tokens, and their outputs are *unmerged* back to ``N`` tokens (every
  source gets a copy of its destination's output) before the residual addition.
* **todo** -- Smith, Fu, Sun et al., "ToDo: Token Downsampling for Efficient Generation
  of High-Resolution Images", 2024, https://arxiv.org/abs/2402.13573. The keys and
  values of the self-attention come from the token grid downsampled by
  ``downsample_factor`` in each direction (``nearest-exact`` by default, so factor 2
  keeps 1 token in 4); the queries are untouched, so the output already has ``N`` tokens
  and nothing needs unmerging.

How a UNet is patched (module hooks only; no forward is copied, no class swapped)
--------------------------------------------------------------------------------
All changes are ``torch.nn.Module`` hooks, registered through the public
``register_forward_pre_hook`` / ``register_forward_hook`` API and removed through their
``RemovableHandle``\\ s; no attribute, class, forward, weight or attention processor of
the model is touched, so :meth:`DiffusionTokenMergeHandle.remove` leaves the hook
tables exactly as they were and the outputs bit-identical to the unpatched model.

* the UNet gets a pre-hook that reads the latent ``sample [B, 4, H, W]`` (the token
  grid of a block at downsample ``d`` is ``ceil(H/d) x ceil(W/d)``, checked against the
  block's token count) and a hook that closes the pass for :attr:`~DiffusionTokenMergeHandle.stats`;
* **tomesd**: each patched ``BasicTransformerBlock`` gets a pre-hook that computes the
  matching from the block input ``hidden_states`` (tomesd's metric) and keeps it for
  this call; ``attn1`` / ``attn2`` / ``ff`` (as selected by ``merge_attn`` /
  ``merge_crossattn`` / ``merge_mlp``) get a pre-hook that merges their ``hidden_states``
  argument and a hook that unmerges their output. This is exactly where tomesd merges
  (``m(norm(x))``) and unmerges (before the residual add); the AdaLayerNormZero gate
  and shift/scale that some blocks apply around these calls are per-sample and per
  channel, so they commute with merging. The matching is
  :func:`core.tokens.bipartite.bipartite_soft_matching` with a ``partition`` tensor
  marking the destinations; it keeps the surviving tokens in place (tomesd reorders
  them as ``[unmerged sources, destinations]``), which self-attention without
  positional encodings cannot see: after unmerging both give the same tokens, up to
  the floating-point order of the attention sums.
* **todo**: each patched block's ``attn1`` gets a pre-hook that passes the downsampled
  tokens as ``encoder_hidden_states``. diffusers' attention processors take keys and
  values from ``encoder_hidden_states`` when it is given (``to_k``/``to_v`` are
  per-token linear maps, so downsampling before or after them is the same), and
  queries from ``hidden_states``. This is the least invasive way: a wrapping attention
  processor would have to replace (and later restore) the processors that the user,
  IP-adapters or ``set_attn_processor`` installed, and would need one wrapper per
  processor type; the hook works with every processor that honours
  ``encoder_hidden_states`` (AttnProcessor, AttnProcessor2_0, xformers, sliced). Self
  attentions with fused QKV projections (``fuse_qkv_projections``) are refused at run
  time because their processor ignores a separate ``encoder_hidden_states``.

Differences from the tomesd package (all deliberate)
----------------------------------------------------
* **No silent caps.** tomesd caps ``r`` at the number of source tokens (a ratio above
  ``1 - 1/(sx*sy)``, 0.75 by default, silently acts as 0.75). Here a ratio outside
  ``[0, max_ratio(sx, sy)]`` is a :class:`TokenMergeError` naming the maximum.
* **Own random generator.** ``use_rand`` draws each block's destinations from a CPU
  ``torch.Generator`` seeded with ``seed`` and owned by the handle (tomesd forks the
  global RNG's state on first use, so its draws depend on it); torch's global RNG, and
  hence a sampler's noise, is never read or advanced. The generator is advanced once per
  patched block call in execution order, with the same call as tomesd, so a tomesd whose
  ``_tome_info["args"]["generator"]`` is ``torch.Generator().manual_seed(seed)`` draws the
  same partitions. :meth:`DiffusionTokenMergeHandle.reseed` restarts the stream (to
  reproduce an image with the same seed). One draw is shared by the whole batch, so the
  unconditional and conditional halves of a classifier-free-guidance batch use the same
  partition.
* **Odd batches with use_rand are an error.** tomesd silently turns ``use_rand`` off
  when the batch is odd (then the two CFG halves run in separate calls and would get
  different partitions); here it is a :class:`TokenMergeError` asking for
  ``use_rand=False`` or a batched ``[uncond, cond]`` call.
* **max_downsample default.** ``None`` (the default) means the finest resolution that
  has transformer blocks: 1 on SD 1.x/2.x (tomesd's default), 2 on SDXL, where tomesd's
  default of 1 silently patches nothing. A value that selects no block is an error
  naming the resolutions the UNet has. Which blocks run at which downsample is read
  from the UNet's structure (down/mid/up blocks and their down/upsamplers), so
  ``patched_blocks`` is known at ``apply`` time.
* **Bad input is refused**, not crashed on or worked around: a token grid smaller than
  one ``sx`` x ``sy`` cell, an attention mask on a merged attention, chunked
  feed-forward with ``merge_mlp``, gradient checkpointing with ``use_rand`` while
  gradients are enabled (the recomputation would draw another partition).
* A model patched by tomesd (an active ``_tome_info`` patch: its hooks or its
  ``ToMeBlock`` classes) is refused; a stale ``_tome_info`` left by
  ``tomesd.remove_patch`` is ignored.

Importing this module is cheap: torch and diffusers are imported lazily.
"""

from __future__ import annotations

import numbers
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.tokens.bipartite import TokenMergeError, _as_count

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

__all__ = [
    "DOWNSAMPLE_METHODS",
    "DiffusionTokenMergeHandle",
    "METHODS",
    "SUPPORTED",
    "apply",
    "find_unet",
    "legal_ranges",
    "max_ratio",
    "method_specs",
    "transformer_levels",
]

TOMESD_PAPER = "https://arxiv.org/abs/2303.17604"
TODO_PAPER = "https://arxiv.org/abs/2402.13573"

METHODS = ("tomesd", "todo")
"""The diffusion methods this module implements (names in :func:`core.tokens.methods`)."""

SUPPORTED = (
    "UNet2DConditionModel",
    "diffusers pipelines with a .unet (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)",
)
"""What :func:`apply` accepts."""

DOWNSAMPLE_METHODS = ("nearest-exact", "avg_pool", "bilinear", "bicubic")
"""ToDo's ways to downsample the key/value token grid (``avg_pool``: mean over cells)."""

MAX_DOWNSAMPLE_CHOICES = (1, 2, 4, 8)
"""tomesd's ``max_downsample`` values (any power of two is accepted for deeper UNets)."""

SEED_RANGE = (0, 2**64 - 1)

# One live handle per UNet: a second apply replaces the first (never stacks). A weak
# map, so that nothing is stored on the model.
_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- legal ranges


def max_ratio(sx: int = 2, sy: int = 2) -> float:
    """The largest legal tomesd ``ratio`` for destination strides ``sx``, ``sy``: ``1 - 1/(sx*sy)``.

    One token of every ``sx`` x ``sy`` cell is a destination and never merges away, so at
    most the other ``1 - 1/(sx*sy)`` of the tokens can (tokens outside the last full
    row/column of cells are all sources, so the bound holds for any grid). ``sx = sy = 1``
    makes every token a destination: the maximum is 0.
    """
    sx = _as_count("sx", sx, 1)
    sy = _as_count("sy", sy, 1)
    return 1.0 - 1.0 / (sx * sy)


def legal_ranges(method: str = "tomesd", model=None, *, sx: int = 2, sy: int = 2) -> dict:
    """The legal values of each option of ``method``, computed for ``sx``/``sy`` (and ``model``).

    Returns ``{option: (low, high)}`` for numbers (None: unbounded) and
    ``{option: tuple_of_choices}`` for choices (bool options are omitted). With ``model`` (a UNet or pipeline),
    ``max_downsample`` lists the downsample factors at which the UNet has transformer
    blocks (every value from the smallest up selects at least one block).
    """
    if method not in METHODS:
        raise TokenMergeError(f"method={method!r} is not a diffusion token-merging method; use {' or '.join(METHODS)}.")
    levels = MAX_DOWNSAMPLE_CHOICES
    if model is not None:
        unet = find_unet(model)
        if unet is None:
            raise _unsupported(model, method)
        levels = tuple(sorted(transformer_levels(unet)))
    if method == "tomesd":
        return {
            "ratio": (0.0, max_ratio(sx, sy)),
            "max_downsample": levels,
            "sx": (1, None),
            "sy": (1, None),
            "seed": SEED_RANGE,
        }
    return {
        "downsample_factor": (1, None),
        "max_downsample": levels,
        "downsample_method": DOWNSAMPLE_METHODS,
    }


# --------------------------------------------------------------------------- registry


def method_specs() -> list:
    """:class:`core.tokens.api.MethodSpec`\\ s of ``tomesd`` and ``todo`` for the registry."""
    from core.tokens.api import MethodSpec, ParamSpec

    max_downsample = ParamSpec(
        "max_downsample",
        "choice",
        None,
        "Patch the transformer blocks whose token grid is at most this many times coarser than the latent "
        "(1, 2, 4 or 8). Empty: the finest resolution that has transformer blocks (1 on SD 1.x/2.x, 2 on SDXL).",
        choices=MAX_DOWNSAMPLE_CHOICES,
    )
    tomesd = MethodSpec(
        name="tomesd",
        display_name="ToMe for Stable Diffusion (tomesd)",
        paper=TOMESD_PAPER,
        description=(
            "Merges similar latent tokens before the self-attention of each UNet transformer block (one "
            "destination per sx x sy cell) and unmerges after it; a patch of module hooks, removable exactly."
        ),
        parameters=(
            ParamSpec(
                "ratio",
                "float",
                0.5,
                "Fraction of the tokens merged away in each patched block (r = int(ratio * N)). At most "
                "1 - 1/(sx*sy) (0.75 for 2 x 2): one destination per cell stays. Larger is an error, not a cap.",
                range=(0.0, max_ratio(2, 2)),
            ),
            max_downsample,
            ParamSpec("sx", "int", 2, "Width of the cells that each hold one destination token.", range=(1, None)),
            ParamSpec("sy", "int", 2, "Height of the cells that each hold one destination token.", range=(1, None)),
            ParamSpec(
                "use_rand",
                "bool",
                True,
                "Pick a random destination in each cell (from the handle's own generator, never the global RNG); "
                "off: the top-left token. Needs an even batch ([unconditional, conditional]).",
            ),
            ParamSpec(
                "seed",
                "int",
                0,
                "Seed of the generator behind use_rand (handle.reseed() restarts it).",
                range=SEED_RANGE,
            ),
            ParamSpec("merge_attn", "bool", True, "Merge tokens for the self-attention (recommended)."),
            ParamSpec("merge_crossattn", "bool", False, "Merge tokens for the cross-attention (not recommended)."),
            ParamSpec("merge_mlp", "bool", False, "Merge tokens for the feed-forward (strongly not recommended)."),
            ParamSpec(
                "trace_source",
                "bool",
                False,
                "Keep each block's token assignment [B, N] of the last forward (handle.sources) for display.",
            ),
        ),
        apply_fn=lambda model, **options: apply(model, "tomesd", **options),
        targets=SUPPORTED,
    )
    todo = MethodSpec(
        name="todo",
        display_name="ToDo (token downsampling)",
        paper=TODO_PAPER,
        description=(
            "Computes the keys and values of each UNet self-attention from a downsampled token grid; queries "
            "and output keep every token, so nothing is unmerged."
        ),
        parameters=(
            ParamSpec(
                "downsample_factor",
                "int",
                2,
                "Downsampling of the key/value grid in each direction (2: 4x fewer keys and values; 1: off).",
                range=(1, None),
            ),
            max_downsample,
            ParamSpec(
                "downsample_method",
                "choice",
                "nearest-exact",
                "How the key/value grid is downsampled: nearest-exact (the paper's default), avg_pool "
                "(mean over each cell), bilinear or bicubic.",
                choices=DOWNSAMPLE_METHODS,
            ),
        ),
        apply_fn=lambda model, **options: apply(model, "todo", **options),
        targets=SUPPORTED,
    )
    return [tomesd, todo]


# --------------------------------------------------------------------------- targets


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def find_unet(model):
    """The ``UNet2DConditionModel`` that ``model`` is or holds as ``.unet``; None otherwise.

    Never imports diffusers (class names are compared), so it is cheap on other models.
    """
    if "UNet2DConditionModel" in _class_names(model):
        return model
    try:
        unet = getattr(model, "unet", None)
    except Exception:  # pragma: no cover - an odd __getattr__
        return None
    if unet is not None and "UNet2DConditionModel" in _class_names(unet):
        return unet
    return None


def _unsupported(model, method: str) -> TokenMergeError:
    return TokenMergeError(
        f"method {method!r} does not support a {type(model).__name__}; it patches diffusers UNets: "
        f"{', '.join(SUPPORTED)} (transformers encoders use method='tome' or 'pitome')."
    )


@dataclass
class _Block:
    """One ``BasicTransformerBlock`` of the UNet and the downsample factor it runs at."""

    name: str
    module: Any
    level: int


def _transformer_blocks(unet) -> list[_Block]:
    """Every transformer block of a UNet2DConditionModel, in execution order, with its level.

    The level (1, 2, 4, ...) is how many times coarser than the latent the block's token
    grid is: down blocks run at the current level and then halve the resolution if they
    have downsamplers; the mid block runs at the coarsest level; up blocks run at the
    current level and then double it if they have upsamplers.
    """
    from diffusers.models.attention import BasicTransformerBlock

    found: list[_Block] = []

    def collect(prefix: str, container, level: int) -> None:
        for name, module in container.named_modules():
            if isinstance(module, BasicTransformerBlock):
                found.append(_Block(f"{prefix}.{name}" if name else prefix, module, level))

    level = 1
    for index, block in enumerate(unet.down_blocks):
        collect(f"down_blocks.{index}", block, level)
        if getattr(block, "downsamplers", None):
            level *= 2
    if getattr(unet, "mid_block", None) is not None:
        collect("mid_block", unet.mid_block, level)
    for index, block in enumerate(unet.up_blocks):
        collect(f"up_blocks.{index}", block, level)
        if getattr(block, "upsamplers", None):
            level = max(1, level // 2)
    seen = {id(b.module) for b in found}
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and id(module) not in seen:
            raise TokenMergeError(
                f"the {type(unet).__name__} has a transformer block outside its down/mid/up blocks ({name}); "
                "its resolution is unknown, so this UNet layout is not supported."
            )
    return found


def transformer_levels(model) -> dict[int, int]:
    """``{downsample factor: number of transformer blocks}`` of a UNet (or a pipeline's UNet)."""
    unet = find_unet(model)
    if unet is None:
        raise _unsupported(model, "tomesd")
    levels: dict[int, int] = {}
    for block in _transformer_blocks(unet):
        levels[block.level] = levels.get(block.level, 0) + 1
    return dict(sorted(levels.items()))


def _check_foreign(unet) -> None:
    """Refuse a UNet with an active tomesd (or look-alike) patch; a stale ``_tome_info`` is fine."""
    for name, module in unet.named_modules():
        where = name or type(unet).__name__
        if type(module).__name__ == "ToMeBlock":
            raise TokenMergeError(
                f"{where} is a ToMeBlock: the UNet is already patched by tomesd; call tomesd.remove_patch on it "
                "or load it afresh."
            )
        if "_tome_info" in module.__dict__:
            info = module.__dict__["_tome_info"]
            hooks = info.get("hooks") if isinstance(info, dict) else None
            if not isinstance(hooks, list) or hooks:
                raise TokenMergeError(
                    f"{where} has a _tome_info attribute with an active patch: the UNet is already patched by "
                    "tomesd (or ToMe/ToDo); call tomesd.remove_patch on it or load it afresh."
                )


# --------------------------------------------------------------------------- options


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TokenMergeError(f"{name}={value!r} must be True or False.")
    return value


def _max_downsample(value, levels: list[int]) -> int:
    if value is None:
        return min(levels)
    number = _as_count("max_downsample", value, 1)
    if number & (number - 1):
        raise TokenMergeError(
            f"max_downsample={number} is not a power of two; use one of {', '.join(map(str, MAX_DOWNSAMPLE_CHOICES))}."
        )
    if number < min(levels):
        shown = ", ".join(str(level) for level in sorted(set(levels)))
        raise TokenMergeError(
            f"max_downsample={number} selects no transformer block: this UNet's transformer blocks run at "
            f"downsample {shown} (SDXL has none at 1); use max_downsample >= {min(levels)}."
        )
    return number


def _validate(method: str, options: dict, blocks: list[_Block]) -> dict:
    """Options checked and completed with defaults (raises naming the option)."""
    from core.tokens.api import _ensure_builtin_methods, _METHODS

    _ensure_builtin_methods()
    known = {p.name: p for p in _METHODS[method].parameters}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TokenMergeError(
            f"{unknown[0]!r} is not an option of method {method!r}; its options are {', '.join(known)}."
        )
    opts = {name: (known[name].default if options.get(name) is None else options[name]) for name in known}
    opts["max_downsample"] = _max_downsample(options.get("max_downsample"), [b.level for b in blocks])
    if method == "tomesd":
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp", "trace_source"):
            opts[name] = _check_bool(name, opts[name])
        opts["sx"] = _as_count("sx", opts["sx"], 1)
        opts["sy"] = _as_count("sy", opts["sy"], 1)
        seed = _as_count("seed", opts["seed"], 0)
        if seed > SEED_RANGE[1]:
            raise TokenMergeError(f"seed={seed} is larger than {SEED_RANGE[1]} (a 64-bit generator seed).")
        opts["seed"] = seed
        ratio = opts["ratio"]
        if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) or getattr(ratio, "ndim", None) == 0):
            raise TokenMergeError(f"ratio={ratio!r} must be a number between 0 and 1.")
        ratio = float(ratio)
        limit = max_ratio(opts["sx"], opts["sy"])
        if not 0.0 <= ratio <= limit:  # also refuses NaN
            raise TokenMergeError(
                f"ratio={ratio!r} is outside [0, {limit:.6g}]: with sx={opts['sx']}, sy={opts['sy']} one token of "
                f"every {opts['sx']}x{opts['sy']} cell stays, so at most 1 - 1/(sx*sy) = {limit:.6g} of the tokens "
                "can merge (tomesd would silently cap it)."
            )
        opts["ratio"] = ratio
        if not (opts["merge_attn"] or opts["merge_crossattn"] or opts["merge_mlp"]):
            raise TokenMergeError(
                "merge_attn, merge_crossattn and merge_mlp are all False: tomesd would merge nothing; "
                "enable at least one (merge_attn=True is tomesd's default)."
            )
    else:
        opts["downsample_factor"] = _as_count("downsample_factor", opts["downsample_factor"], 1)
        if opts["downsample_method"] not in DOWNSAMPLE_METHODS:
            raise TokenMergeError(
                f"downsample_method={opts['downsample_method']!r} is not one of {', '.join(DOWNSAMPLE_METHODS)}."
            )
    return opts


def _todo_ready(block) -> str | None:
    """Why ToDo cannot patch this block's self-attention (None: it can)."""
    attn = block.attn1
    if getattr(block, "only_cross_attention", False) or getattr(attn, "is_cross_attention", False):
        return "its attn1 is a cross-attention"
    for name in ("group_norm", "spatial_norm", "norm_cross"):
        if getattr(attn, name, None) is not None:
            return f"its attn1 has a {name} that keys and values would bypass"
    return None


# --------------------------------------------------------------------------- apply


def apply(model, method: str = "tomesd", **options) -> DiffusionTokenMergeHandle:
    """Patch a diffusers UNet (or a pipeline's ``.unet``) with tomesd or ToDo; returns the handle.

    tomesd options (defaults): ``ratio`` (0.5; ``0 <= ratio <= 1 - 1/(sx*sy)``),
    ``max_downsample`` (None: the finest resolution with transformer blocks; else 1, 2,
    4, 8), ``sx``, ``sy`` (2, 2; >= 1), ``use_rand`` (True), ``seed`` (0), ``merge_attn``
    (True), ``merge_crossattn`` (False), ``merge_mlp`` (False), ``trace_source`` (False).

    todo options: ``downsample_factor`` (2; >= 1), ``max_downsample`` (as above),
    ``downsample_method`` (``"nearest-exact"``; see :data:`DOWNSAMPLE_METHODS`).

    Applying again (either method) replaces the previous patch on the same UNet.

    Raises:
        TokenMergeError: not a UNet, an option out of range (naming it and the legal
            range), nothing to patch, or a UNet already patched by tomesd. The model is
            unchanged when it is raised.
    """
    if method not in METHODS:
        raise TokenMergeError(f"method={method!r} is not a diffusion token-merging method; use {' or '.join(METHODS)}.")
    unet = find_unet(model)
    if unet is None:
        raise _unsupported(model, method)
    blocks = _transformer_blocks(unet)
    if not blocks:
        raise TokenMergeError(
            f"the {type(unet).__name__} has no transformer blocks (no cross-attention down/mid/up blocks): "
            f"{method} has nothing to patch."
        )
    opts = _validate(method, options, blocks)
    _check_foreign(unet)
    selected = [b for b in blocks if b.level <= opts["max_downsample"]]
    skipped: dict[str, str] = {}
    if method == "todo":
        skipped = {b.name: why for b in selected if (why := _todo_ready(b.module)) is not None}
        if len(skipped) == len(selected):
            name, why = next(iter(skipped.items()))
            raise TokenMergeError(f"todo has nothing to patch: {name} (and every other selected block): {why}.")
        selected = [b for b in selected if b.name not in skipped]
    # Everything is validated: only now is anything changed.
    previous = _HANDLES.get(unet)
    if previous is not None:
        previous.remove()
    handle = DiffusionTokenMergeHandle(model, unet, method, opts, selected, skipped)
    handle._patch()
    return handle


# --------------------------------------------------------------------------- the handle


class _Pass:
    """Figures of one UNet forward: latent size, and per patched block call its tokens."""

    __slots__ = (
        "batch",
        "height",
        "width",
        "names",
        "input_tokens",
        "tokens",
        "kv_tokens",
        "merge_seconds",
        "sources",
        "groups",
    )

    def __init__(self, batch: int, height: int, width: int):
        self.batch = batch
        self.height = height
        self.width = width
        self.names: list[str] = []
        self.input_tokens: list[int] = []
        self.tokens: list[int] = []
        self.kv_tokens: list[int] = []
        self.merge_seconds = 0.0
        self.sources: dict = {}
        self.groups: dict | None = None


class DiffusionTokenMergeHandle:
    """A tomesd / ToDo patch on one UNet: ``remove()``, ``stats``, ``reseed()``, ``sources``.

    Usable as a context manager (``with apply(unet, method="tomesd"): ...`` removes it).

    Attributes:
        method: ``"tomesd"`` or ``"todo"``; ``options``: the validated options (with
            ``max_downsample`` resolved to a number).
        model: what :func:`apply` was given; ``unet``: the patched UNet.
        blocks: names of the patched transformer blocks, in execution order.
        skipped: todo only, ``{block name: why}`` for selected blocks it cannot patch
            (a self-attention that is really a cross-attention, or has its own norms).
        active: False once removed (or replaced by a later :func:`apply`).

    :meth:`record_block` picks one patched block whose merge grouping of the last
    forward :attr:`block_groups` returns (for display); :meth:`block_names` gives the
    blocks' readable names.

    A ``copy.deepcopy`` of a patched UNet copies its hooks too (as with tomesd's patch):
    copy the model before :func:`apply` or after :meth:`remove`.
    """

    def __init__(self, model, unet, method: str, options: dict, blocks: list[_Block], skipped: dict | None = None):
        import torch

        self.model = model
        self.unet = unet
        self.method = method
        self.options = dict(options)
        self._blocks = blocks
        self.blocks = [b.name for b in blocks]
        self.skipped = dict(skipped or {})
        self._hooks: list = []
        self._slots: list = [None] * len(blocks)
        self._pass: _Pass | None = None
        self._last: _Pass | None = None
        self._grid_cache: dict = {}
        self._record: int | None = None
        self._generator = None
        if method == "tomesd":
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(options["seed"])
        self.active = False

    # ------------------------------------------------------------------ patch / remove

    def _patch(self) -> None:
        try:
            add = self._hooks.append
            add(self.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
            add(self.unet.register_forward_hook(self._unet_post))
            for index, block in enumerate(self._blocks):
                module = block.module
                if self.method == "todo":
                    add(module.attn1.register_forward_pre_hook(self._todo_hook(index), with_kwargs=True))
                    continue
                add(module.register_forward_pre_hook(self._block_hook(index), with_kwargs=True))
                targets = []
                if self.options["merge_attn"]:
                    targets.append(module.attn1)
                if self.options["merge_crossattn"] and getattr(module, "attn2", None) is not None:
                    targets.append(module.attn2)
                if self.options["merge_mlp"]:
                    targets.append(module.ff)
                for target in targets:
                    merge_in, unmerge_out = self._merge_hooks(index)
                    add(target.register_forward_pre_hook(merge_in, with_kwargs=True))
                    add(target.register_forward_hook(unmerge_out))
        except BaseException:
            self.remove()
            raise
        _HANDLES[self.unet] = self
        self.active = True

    def remove(self) -> None:
        """Undo the patch: every hook is removed; the UNet is exactly as before :func:`apply`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._slots = [None] * len(self._blocks)
        self._pass = None
        if _HANDLES.get(self.unet) is self:
            del _HANDLES[self.unet]
        self.active = False

    def block_names(self) -> list[str]:
        """Readable names of the patched blocks, in execution order (the order of ``stats``' per-block lists).

        ``down_blocks.0.attentions.1.transformer_blocks.0`` reads ``down.0.attn.1``;
        ``mid_block`` reads ``mid``; a transformer model holding several blocks (SDXL)
        adds the block's index: ``down.2.attn.0[3]``.
        """
        every = [*self.blocks, *self.skipped]
        parents: dict[str, int] = {}
        for name in every:
            parent = name.rsplit(".transformer_blocks.", 1)[0]
            parents[parent] = parents.get(parent, 0) + 1
        return [_readable(name, parents) for name in self.blocks]

    def record_block(self, index: int | None) -> None:
        """Keep the merge grouping of patched block ``index`` (see :attr:`block_groups`); None: stop.

        ``index`` counts the patched blocks in execution order (as :meth:`block_names`).
        The grouping is recorded during every following forward; it costs one
        ``[B, N]`` int64 tensor.
        """
        if index is not None:
            count = len(self._blocks)
            if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < count:
                raise TokenMergeError(
                    f"record_block: block {index!r} does not exist; this {self.method} patch has {count} "
                    f"blocks (0 to {count - 1}): {', '.join(self.block_names())}."
                )
            index = int(index)
        self._record = index

    @property
    def block_groups(self) -> dict | None:
        """The grouping of the recorded block (:meth:`record_block`) in the last forward, or None.

        ``{"index", "block", "name", "grid": (h, w), "groups": [B, h*w] int64, "count"}``:
        ``groups[b, i]`` is token ``i``'s group id -- tomesd: the index (in the block's
        grid) of the destination token it merged into, or its own index; todo: the
        key/value token (cell of the downsampled ``"kv_grid"``, row-major) whose cell
        it falls in. ``count`` is the number of groups (tokens the merged branches
        process, or key/value tokens). None when nothing was recorded (no block chosen,
        no forward yet, or the block did not run as a self-attention).
        """
        if self._last is None or self._last.groups is None:
            return None
        return dict(self._last.groups)

    def _keep_groups(self, index: int, h: int, w: int, groups, count: int, **extra) -> None:
        state = self._pass
        block = self._blocks[index]
        state.groups = {
            "index": index,
            "block": block.name,
            "name": self.block_names()[index],
            "grid": (h, w),
            "groups": groups,
            "count": count,
            **extra,
        }

    def reseed(self, seed: int | None = None) -> None:
        """Restart the ``use_rand`` generator at ``seed`` (default: the ``seed`` option).

        The stream advances once per patched block call, so calling this before each
        generation makes a generation with the same sampler seed reproducible.
        """
        if self._generator is None:
            raise TokenMergeError("reseed: method 'todo' has no random choices.")
        value = self.options["seed"] if seed is None else _as_count("seed", seed, 0)
        if value > SEED_RANGE[1]:
            raise TokenMergeError(f"seed={value} is larger than {SEED_RANGE[1]} (a 64-bit generator seed).")
        self._generator.manual_seed(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"DiffusionTokenMergeHandle({self.method}, {len(self.blocks)} blocks, {self.options}, {state})"

    # ------------------------------------------------------------------ results

    @property
    def stats(self) -> dict:
        """Figures of the last completed UNet forward.

        ``patched_blocks`` (count) and ``blocks`` (names, execution order) are fixed at
        ``apply``. Per patched block call of the last forward, in execution order
        (``layer_names``): ``tokens_per_layer`` -- tomesd: tokens the merged branches
        process (``N - int(ratio * N)``); todo: query tokens (``N``, unchanged);
        ``input_tokens_per_layer`` (``N``); todo also ``kv_tokens_per_layer`` (keys and
        values after downsampling). ``merge_seconds``: wall time spent matching,
        merging, unmerging (tomesd) or downsampling (todo) -- on a GPU the launch time
        unless the device was synchronised. ``batch_size``, ``latent_size`` ``(H, W)``.
        """
        out = {
            "method": self.method,
            "patched_blocks": len(self.blocks),
            "blocks": list(self.blocks),
            "max_downsample": self.options["max_downsample"],
        }
        last = self._last
        if last is None:
            out.update(
                layer_names=[],
                tokens_per_layer=[],
                input_tokens_per_layer=[],
                merge_seconds=0.0,
                batch_size=None,
                latent_size=None,
            )
        else:
            out.update(
                layer_names=list(last.names),
                tokens_per_layer=list(last.tokens),
                input_tokens_per_layer=list(last.input_tokens),
                merge_seconds=last.merge_seconds,
                batch_size=last.batch,
                latent_size=(last.height, last.width),
            )
        if self.method == "todo":
            out["kv_tokens_per_layer"] = [] if last is None else list(last.kv_tokens)
            out["skipped_blocks"] = dict(self.skipped)
        return out

    @property
    def sources(self) -> dict | None:
        """tomesd with ``trace_source=True``: ``{block name: [B, N] int64}`` of the last forward.

        Entry ``[b, i]`` is the merged token (an index into the block's ``N - r`` merged
        tokens) that input token ``i`` went into. None otherwise or before a forward.
        """
        if self.method != "tomesd" or not self.options["trace_source"] or self._last is None:
            return None
        return dict(self._last.sources)

    def unmerge(self, hidden):
        """Not needed for UNets: every patched block unmerges its own branches, so the UNet's
        hidden states always have every token. Raises :class:`TokenMergeError`."""
        raise TokenMergeError(
            f"{self.method} unmerges inside each block: the UNet's hidden states and output keep every token, "
            "so there is nothing to unmerge (see handle.sources for the per-block assignment)."
        )

    # ------------------------------------------------------------------ runtime

    def _unet_pre(self, module, args, kwargs):
        import torch

        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            raise TokenMergeError(
                f"{self.method} expects the UNet's sample to be a latent [B, C, H, W], got "
                f"{list(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}."
            )
        batch = sample.shape[0]
        if self.method == "tomesd" and self.options["use_rand"] and self.options["ratio"] > 0:
            if batch % 2:
                raise TokenMergeError(
                    f"tomesd with use_rand=True needs an even batch, but this UNet call has batch {batch}: with "
                    "classifier-free guidance the [unconditional, conditional] halves must share one random "
                    "partition, and an odd batch means they run in separate calls with different draws. Pass "
                    "use_rand=False (e.g. without guidance) or batch both halves together (tomesd silently turns "
                    "use_rand off here)."
                )
            if torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False):
                raise TokenMergeError(
                    "tomesd with use_rand=True cannot run under gradient checkpointing while gradients are enabled "
                    "(the recomputed blocks would draw another partition); use use_rand=False or disable it."
                )
        self._slots = [None] * len(self._blocks)
        self._pass = _Pass(batch, sample.shape[-2], sample.shape[-1])
        return None

    def _unet_post(self, module, args, output):
        if self._pass is not None:
            self._last, self._pass = self._pass, None
        self._slots = [None] * len(self._blocks)
        return None

    def _grid(self, index: int, tokens: int) -> tuple[_Pass, int, int]:
        state = self._pass
        block = self._blocks[index]
        if state is None:
            raise TokenMergeError(
                f"{block.name} ran outside a UNet forward: {self.method} reads the latent size from the UNet's "
                "input, so call the UNet (or the pipeline), not a block."
            )
        level = block.level
        h, w = -(-state.height // level), -(-state.width // level)
        if h * w != tokens:
            raise TokenMergeError(
                f"{block.name} got {tokens} tokens, not the {h}x{w} grid expected at downsample {level} of a "
                f"{state.height}x{state.width} latent; this UNet does not lay its tokens out as diffusers' "
                "UNet2DConditionModel does."
            )
        return state, h, w

    # tomesd ------------------------------------------------------------

    def _destinations(self, h: int, w: int, device):
        """``[h * w]`` bool, True on destination tokens: one per full ``sx`` x ``sy`` cell."""
        import torch

        sx, sy = self.options["sx"], self.options["sy"]
        rows, cols = h // sy, w // sx
        use_rand = self.options["use_rand"]
        key = (h, w, str(device))
        if not use_rand and key in self._grid_cache:
            return self._grid_cache[key]
        if use_rand:
            # One draw for the whole batch, [rows, cols, 1]: the position inside each
            # cell, row-major (k -> row k // sx, column k % sx), as in tomesd.
            pick = torch.randint(sy * sx, (rows, cols, 1), generator=self._generator, device="cpu")
        else:
            pick = torch.zeros(rows, cols, 1, dtype=torch.long)
        cells = torch.zeros(rows, cols, sy * sx, dtype=torch.bool)
        cells.scatter_(2, pick, True)
        grid = torch.zeros(h, w, dtype=torch.bool)
        grid[: rows * sy, : cols * sx] = cells.view(rows, cols, sy, sx).transpose(1, 2).reshape(rows * sy, cols * sx)
        mask = grid.reshape(-1).to(device)
        if not use_rand:
            self._grid_cache[key] = mask
        return mask

    def _block_hook(self, index: int):
        block = self._blocks[index]
        opts = self.options

        def hook(module, args, kwargs):
            from core.tokens.bipartite import bipartite_soft_matching

            hidden = args[0] if args else kwargs["hidden_states"]
            tokens = hidden.shape[1]
            state, h, w = self._grid(index, tokens)
            start = time.perf_counter()
            r = int(tokens * opts["ratio"])
            merge = None
            if r > 0:
                if (h // opts["sy"]) * (w // opts["sx"]) == 0:
                    raise TokenMergeError(
                        f"{block.name}: its {h}x{w} token grid (downsample {block.level}) is smaller than one "
                        f"sx x sy = {opts['sx']}x{opts['sy']} cell, so it has no destination token; lower sx/sy or "
                        "max_downsample, or use a larger image."
                    )
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                if mask is not None and opts["merge_attn"]:
                    raise TokenMergeError(
                        f"{block.name}: tomesd cannot merge a self-attention that has an attention mask over its "
                        "tokens; call the UNet without attention_mask or use merge_attn=False."
                    )
                if opts["merge_mlp"] and getattr(module, "_chunk_size", None) is not None:
                    raise TokenMergeError(
                        f"{block.name}: merge_mlp does not work with chunked feed-forward "
                        "(unet.enable_forward_chunking); disable one of them."
                    )
                partition = self._destinations(h, w, hidden.device)
                merge = bipartite_soft_matching(hidden, r, partition=partition)
                if opts["trace_source"]:
                    state.sources[block.name] = merge.assignment
            self._slots[index] = merge
            if self._record == index:
                self._keep_groups(index, h, w, _merge_groups(merge, hidden.shape[0], tokens), tokens - r)
            state.names.append(block.name)
            state.input_tokens.append(tokens)
            state.tokens.append(tokens - r)
            state.merge_seconds += time.perf_counter() - start
            return None

        return hook

    def _merge_hooks(self, index: int):
        def merge_in(module, args, kwargs):
            merge = self._slots[index]
            if merge is None:
                return None
            start = time.perf_counter()
            if args:
                args = (merge.merge(args[0]), *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": merge.merge(kwargs["hidden_states"])}
            self._pass.merge_seconds += time.perf_counter() - start
            return args, kwargs

        def unmerge_out(module, args, output):
            merge = self._slots[index]
            if merge is None:
                return None
            start = time.perf_counter()
            output = merge.unmerge(output)
            self._pass.merge_seconds += time.perf_counter() - start
            return output

        return merge_in, unmerge_out

    # todo --------------------------------------------------------------

    def _todo_hook(self, index: int):
        block = self._blocks[index]
        factor = self.options["downsample_factor"]
        method = self.options["downsample_method"]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            if context is not None:  # used as a cross-attention by its caller: not ours to change
                return None
            tokens = hidden.shape[1]
            state, h, w = self._grid(index, tokens)
            state.names.append(block.name)
            state.input_tokens.append(tokens)
            state.tokens.append(tokens)
            new_h, new_w = h // factor, w // factor
            if self._record == index and new_h and new_w:
                cells = _cell_groups(h, w, new_h, new_w).expand(hidden.shape[0], -1)
                self._keep_groups(index, h, w, cells, new_h * new_w, kv_grid=(new_h, new_w))
            if factor == 1:
                state.kv_tokens.append(tokens)
                return None
            start = time.perf_counter()
            if new_h == 0 or new_w == 0:
                raise TokenMergeError(
                    f"{block.name}: downsample_factor={factor} is larger than its {h}x{w} token grid "
                    f"(downsample {block.level}); lower it or max_downsample."
                )
            mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            if mask is not None:
                raise TokenMergeError(
                    f"{block.name}: todo cannot downsample the keys of a self-attention that has an attention mask; "
                    "call the UNet without attention_mask."
                )
            if getattr(module, "fused_projections", False):
                raise TokenMergeError(
                    f"{block.name}: todo needs separate key/value projections, but this self-attention has fused "
                    "QKV projections (unet.fuse_qkv_projections()); call unet.unfuse_qkv_projections() first."
                )
            kv = _downsample(hidden, h, w, new_h, new_w, method)
            state.kv_tokens.append(new_h * new_w)
            state.merge_seconds += time.perf_counter() - start
            if len(args) > 1:
                args = (args[0], kv, *args[2:])
            else:
                kwargs = {**kwargs, "encoder_hidden_states": kv}
            return args, kwargs

        return hook


def _readable(name: str, parents: dict[str, int]) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0`` -> ``down.0.attn.1`` (see ``block_names``)."""
    parent, _, inner = name.rpartition(".transformer_blocks.")
    if not parent:
        parent, inner = name, ""
    words = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "attentions": "attn"}
    text = ".".join(words.get(part, part) for part in parent.split("."))
    if inner and parents.get(parent, 1) > 1:
        text += f"[{inner}]"
    return text


def _merge_groups(merge, batch: int, tokens: int) -> Tensor:
    """``[B, N]`` int64: for each token the index of the token it merged into (its destination) or its own."""
    import torch

    if merge is None or merge.is_identity:
        return torch.arange(tokens).expand(batch, tokens).clone()
    # Each output slot's input row (flat over the batch): the destination, or the unmerged token itself.
    keep = merge._keep.reshape(batch, merge.n_out) - torch.arange(batch, device=merge._keep.device)[:, None] * tokens
    return keep.gather(1, merge.assignment).cpu()


def _cell_groups(h: int, w: int, new_h: int, new_w: int) -> Tensor:
    """``[1, h*w]`` int64: the cell of the ``new_h`` x ``new_w`` downsampled grid each token lies in (row-major)."""
    import torch

    rows = torch.arange(h) * new_h // h
    cols = torch.arange(w) * new_w // w
    return (rows[:, None] * new_w + cols[None, :]).reshape(1, h * w)


def _downsample(hidden: Tensor, h: int, w: int, new_h: int, new_w: int, method: str) -> Tensor:
    """``[B, h*w, C] -> [B, new_h*new_w, C]``: the token grid resized (ToDo's key/value tokens)."""
    import torch.nn.functional as F

    batch, _, channels = hidden.shape
    grid = hidden.reshape(batch, h, w, channels).permute(0, 3, 1, 2)
    if method == "avg_pool":
        small = F.interpolate(grid, size=(new_h, new_w), mode="area")
    elif method == "nearest-exact":
        small = F.interpolate(grid, size=(new_h, new_w), mode="nearest-exact")
    else:
        small = F.interpolate(grid, size=(new_h, new_w), mode=method, align_corners=False)
    return small.permute(0, 2, 3, 1).reshape(batch, new_h * new_w, channels)
