"""The public token-merging API: ``apply(model, method=..., **options)`` and ``methods()``.

ToMe on Hugging Face transformers encoders, from the paper (no code was copied from
facebookresearch/ToMe or tomesd):

* **ToMe** -- Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT
  But Faster", ICLR 2023, https://arxiv.org/abs/2210.09461. In every transformer
  layer, *between the attention and the MLP*, the r most similar tokens are merged by
  bipartite soft matching on the attention keys averaged over heads; merged tokens are
  averaged weighted by their size, and *proportional attention* adds ``log(size)`` to
  the attention logits of the following layers.
* **Threshold mode** (DyMU, https://arxiv.org/abs/2504.17040): merge every edge above a
  cosine similarity instead of a fixed r.

How a model is patched, and why removal is exact
------------------------------------------------
Only two things change, both on *instances*, never on classes:

1. each encoder layer gets an instance attribute ``forward`` (a bound method of this
   module's making). ``nn.Module.__call__`` finds it before the class's ``forward``;
   :meth:`TokenMergeHandle.remove` deletes it from the instance ``__dict__``, after
   which attribute lookup finds the class's own, untouched function again;
2. each layer's key projection gets one forward hook that keeps a reference to its
   output (the merge metric, so the keys are not computed twice); ``remove`` removes
   it through its ``RemovableHandle``.

Nothing else is touched: no weights, no classes, no config, no attribute of the model.
With r = 0 the patched layer calls the same sub-modules, in the same order, with the
same arguments as the class's ``forward`` and passes the layer's attention mask through
untouched, so the output is bit-for-bit the unpatched one; after ``remove`` the
model's ``__dict__``\\ s and hook tables are what they were before ``apply``.

Applying again replaces the previous patch (the patched forwards carry a reference
to their handle, which ``apply`` removes first), so patches never stack. A model
patched by another tool (ToMe/tomesd's ``_tome_info`` attribute, a swapped layer
class, an instance ``forward`` that is not ours) is refused, and every option is
validated before anything is patched: a failed ``apply`` leaves the model unchanged
(including a previous patch of ours).

The per-forward work lives on the handle (:class:`TokenMergeHandle`): the patched
layer ``i`` calls ``handle._enter(i, hidden, mask)`` at its top (layer 0 starts a new
pass) to get the attention mask it must use, and ``handle._merge(i, x)`` after its
attention block. Per-architecture layer forwards live in :mod:`core.tokens.text`
(BERT) and :mod:`core.tokens.vit` (ViT, DeiT, CLIP vision).

Importing this module is cheap: torch and transformers are imported lazily.
"""

from __future__ import annotations

import math
import numbers
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from core.tokens.bipartite import TokenMergeError, parse_r

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

__all__ = [
    "EncoderTarget",
    "MethodSpec",
    "ParamSpec",
    "TokenMergeError",
    "TokenMergeHandle",
    "apply",
    "methods",
    "register_method",
    "supported_classes",
]

# Marker set on the functions we install as a layer's ``forward``: it points at the
# handle that owns them, so a second ``apply`` can find and remove the first patch.
_MARK = "_mergestudio_token_merge"

# Attention implementations whose attention-mask argument accepts an additive float
# bias [B, 1, 1, N] (proportional attention, merged padding). Flash kernels do not.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ParamSpec:
    """One option of a method, as the GUI shows it.

    ``type`` is one of ``"int"``, ``"float"``, ``"bool"``, ``"choice"`` or ``"r"`` (an
    int, a list with one int per layer, or a pair ``(r, inflection)``). ``range`` is
    ``(low, high)`` with None for unbounded; ``choices`` lists the legal values of a
    ``"choice"``. ``exclusive`` names options that may not be given together with this
    one (exactly one of ``r`` / ``threshold``).
    """

    name: str
    type: str
    default: Any
    help: str
    range: tuple | None = None
    choices: tuple | None = None
    exclusive: tuple = ()

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "range": list(self.range) if self.range is not None else None,
            "choices": list(self.choices) if self.choices is not None else None,
            "exclusive": list(self.exclusive),
            "help": self.help,
        }


@dataclass(frozen=True)
class MethodSpec:
    """A token-merging method: its description and how it matches tokens.

    ``make_matcher(options, num_layers)`` returns ``match(metric, layer, amount,
    protected) -> Merge`` where ``amount`` is the layer's r (fixed mode) or threshold.
    A method that patches models its own way (the diffusion methods of
    :mod:`core.tokens.diffusion`) gives ``apply_fn(model, **options) -> handle`` instead,
    and ``targets``, the model classes it accepts.
    ``check_schedule(schedule, num_tokens, protected)`` may refuse a schedule that
    :func:`~core.tokens.bipartite.parse_r` accepted (a method whose limit on r is lower
    than bipartite matching's); it raises :class:`TokenMergeError`.
    """

    name: str
    display_name: str
    paper: str
    description: str
    parameters: tuple[ParamSpec, ...]
    make_matcher: Callable[[dict, int], Callable] | None = None
    threshold_mode: bool = False
    check_schedule: Callable[[list, int, int], None] | None = None
    extra_papers: tuple = field(default_factory=tuple)
    apply_fn: Callable[..., Any] | None = None
    targets: tuple | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "paper": self.paper,
            "papers": [self.paper, *self.extra_papers],
            "description": self.description,
            "targets": list(self.targets) if self.targets is not None else supported_classes(),
            "parameters": [p.as_dict() for p in self.parameters],
        }


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Add (or replace) a method in the registry that :func:`apply` and :func:`methods` read."""
    _METHODS[spec.name] = spec


def methods() -> list[dict]:
    """Every token-merging method (encoders and diffusion UNets) with its parameters; the GUI builds its panel from it.

    Each entry: ``name``, ``display_name``, ``paper`` (link), ``papers``,
    ``description``, ``targets`` (supported model classes) and ``parameters``, a list
    of ``{name, type, default, range, choices, exclusive, help}``.
    """
    _ensure_builtin_methods()
    return [spec.as_dict() for spec in _METHODS.values()]


_R_HELP = (
    "Tokens merged in each layer: an int (the same r everywhere), a list with one int per layer, "
    "or a pair (r, inflection) with inflection in [-1, 1] for a linear schedule from r*(1-inflection) "
    "to r*(1+inflection) (-1: decreasing, ToMe's best speed/accuracy trade-off). "
    "At most half of the unprotected tokens can merge in one layer."
)
_COMMON = (
    ParamSpec(
        "prop_attn",
        "bool",
        True,
        "Proportional attention: add log(size) to the attention logits so a merged token counts "
        "as many times as the tokens it replaced (ToMe Sec. 3).",
    ),
    ParamSpec(
        "protect_cls",
        "bool",
        True,
        "Never merge the class token (index 0; DeiT also its distillation token at index 1), "
        "which poolers and classifiers read.",
    ),
    ParamSpec(
        "trace_source",
        "bool",
        False,
        "Keep the dense source matrix of the last forward (handle.sources, [B, N_merged, N_input]) "
        "for visualisation. The compact assignment behind handle.unmerge is always kept.",
    ),
)


def _tome_matcher(options: dict, num_layers: int) -> Callable:
    from core.tokens.bipartite import bipartite_soft_matching, threshold_soft_matching

    if options.get("threshold") is not None:

        def match(metric, layer, amount, protected):
            return threshold_soft_matching(metric, amount, protected=protected)

    else:

        def match(metric, layer, amount, protected):
            return bipartite_soft_matching(metric, amount, protected=protected)

    return match


def _pitome_matcher(options: dict, num_layers: int) -> Callable:
    from core.tokens import pitome

    alpha = options["alpha"]
    if options.get("margin") is None:
        margins = pitome.margin_schedule(num_layers)
    else:
        margins = [options["margin"]] * num_layers

    def match(metric, layer, amount, protected):
        return pitome.pitome_soft_matching(metric, amount, protected=protected, margin=margins[layer], alpha=alpha)

    return match


def _pitome_check(schedule: list, num_tokens: int, protected: int) -> None:
    from core.tokens import pitome

    remaining = num_tokens
    for layer, value in enumerate(schedule):
        limit = pitome.max_r(remaining, protected=protected)
        if value > limit:
            raise TokenMergeError(
                f"r={value} at layer {layer} (counting from 0) is more than the {limit} tokens PiToMe can merge "
                f"there ({remaining} tokens enter, {protected} protected; PiToMe needs 2r unprotected candidates)."
            )
        remaining -= value


def _ensure_builtin_methods() -> None:
    if "tome" not in _METHODS:
        register_method(
            MethodSpec(
                name="tome",
                display_name="ToMe (Token Merging)",
                paper="https://arxiv.org/abs/2210.09461",
                extra_papers=("https://arxiv.org/abs/2504.17040",),
                description=(
                    "Bipartite soft matching on the attention keys, between attention and MLP of every layer; "
                    "merges the r most similar tokens per layer, or (threshold) every pair more similar than a "
                    "cosine threshold, as in DyMU."
                ),
                parameters=(
                    ParamSpec("r", "r", 8, _R_HELP, range=(0, None), exclusive=("threshold",)),
                    ParamSpec(
                        "threshold",
                        "float",
                        None,
                        "Instead of r: merge every A->B pair whose key cosine similarity exceeds this value "
                        "(DyMU), so the count adapts to the input. A number in [-1, 1], or one per layer.",
                        range=(-1.0, 1.0),
                        exclusive=("r",),
                    ),
                    *_COMMON,
                ),
                make_matcher=_tome_matcher,
                threshold_mode=True,
            )
        )
    if "pitome" not in _METHODS:
        try:  # PiToMe's matching lives in its own module; list it only when that module is there.
            from core.tokens import pitome

            ready = hasattr(pitome, "pitome_soft_matching") and hasattr(pitome, "margin_schedule")
        except ImportError:  # pragma: no cover - the module ships with the project
            ready = False
        if ready:
            register_method(
                MethodSpec(
                    name="pitome",
                    display_name="PiToMe (spectrum-preserving token merging)",
                    paper="https://arxiv.org/abs/2405.16148",
                    description=(
                        "Energy-score merging: tokens in large clusters of near-duplicates merge first, isolated, "
                        "informative tokens are kept."
                    ),
                    parameters=(
                        ParamSpec(
                            "r", "r", 8, _R_HELP + " PiToMe merges at most floor(unprotected / 2).", range=(0, None)
                        ),
                        ParamSpec(
                            "margin",
                            "float",
                            None,
                            "Energy margin m in [-1, 1]; empty: the paper's schedule 0.9 - 0.9 * layer / layers.",
                            range=(-1.0, 1.0),
                        ),
                        ParamSpec(
                            "alpha", "float", 1.0, "Scale of the energy below the margin (>= 0).", range=(0.0, None)
                        ),
                        *_COMMON,
                    ),
                    make_matcher=_pitome_matcher,
                    check_schedule=_pitome_check,
                )
            )
    if "tomesd" not in _METHODS:
        # Diffusers UNets (tomesd, ToDo): patched by module hooks in core.tokens.diffusion.
        from core.tokens import diffusion

        for diffusion_spec in diffusion.method_specs():
            register_method(diffusion_spec)


# --------------------------------------------------------------------------- targets


@dataclass
class EncoderTarget:
    """What :func:`apply` patches in one model (built by ``text.find_target`` / ``vit.find_target``).

    Attributes:
        model: the object ``apply`` was given.
        family: ``"bert"``, ``"vit"``, ``"deit"`` or ``"clip"``.
        encoder: the module whose layers are patched (for messages).
        layers: the encoder layers, in order.
        layer_class: the exact class every layer must have (another class means a
            class-swapping tool got there first).
        key_modules: per layer, the ``nn.Linear`` producing the attention keys
            ``[B, N, heads * head_dim]``.
        num_heads: attention heads (the metric averages the keys over them).
        make_forward: ``make_forward(handle, index) -> function(self, hidden, mask, ...)``,
            the patched layer forward.
        special_tokens: leading tokens that ``protect_cls`` protects (CLS; + distillation).
        num_tokens: tokens entering layer 0 when fixed by the config (vision), else None.
        max_tokens: the longest input the model accepts (text), else None.
        config: the encoder's config (``_attn_implementation`` is read from it).
    """

    model: Any
    family: str
    encoder: Any
    layers: list
    layer_class: type
    key_modules: list
    num_heads: int
    make_forward: Callable
    special_tokens: int
    config: Any
    num_tokens: int | None = None
    max_tokens: int | None = None


def supported_classes() -> list[str]:
    """Names of the model classes :func:`apply` accepts."""
    from core.tokens import text, vit

    return [*text.SUPPORTED, *vit.SUPPORTED]


def _find_target(model) -> EncoderTarget:
    from core.tokens import text, vit

    for finder in (text.find_target, vit.find_target):
        target = finder(model)
        if target is not None:
            return target
    from core.tokens import diffusion

    if diffusion.find_unet(model) is not None:
        raise TokenMergeError(
            f"a {type(model).__name__} is (or holds) a diffusers UNet: use method='tomesd' or method='todo' "
            "(method='tome' and 'pitome' patch transformers encoders)."
        )
    raise TokenMergeError(
        f"token merging does not support a {type(model).__name__}; supported: {', '.join(supported_classes())}."
    )


# --------------------------------------------------------------------------- options


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TokenMergeError(f"{name}={value!r} must be True or False.")
    return value


def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0):
        raise TokenMergeError(f"{name}={value!r} must be a number in [-1, 1].")
    number = float(value)
    if not -1.0 <= number <= 1.0:  # also refuses NaN
        raise TokenMergeError(f"{name}={number!r} is outside [-1, 1] (it is a cosine similarity).")
    return number


def _thresholds(value, num_layers: int) -> list[float]:
    """``threshold`` as one number per layer."""
    if isinstance(value, (str, bytes)):
        raise TokenMergeError(f"threshold={value!r} must be a number in [-1, 1] (or a list, one per layer).")
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and getattr(value, "ndim", 1) != 0):
        values = list(value.tolist() if hasattr(value, "tolist") else value)
        if len(values) != num_layers:
            raise TokenMergeError(
                f"threshold is a list of {len(values)} values but the model has {num_layers} layers; "
                "give one per layer."
            )
        return [_check_unit_interval(f"threshold[{i}]", v) for i, v in enumerate(values)]
    return [_check_unit_interval("threshold", value)] * num_layers


def _validate(spec: MethodSpec, target: EncoderTarget, options: dict) -> dict:
    """Options checked and completed with defaults; raises :class:`TokenMergeError` naming the option."""
    known = {p.name: p for p in spec.parameters}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TokenMergeError(
            f"{unknown[0]!r} is not an option of method {spec.name!r}; its options are {', '.join(known)}."
        )
    layers = len(target.layers)
    opts = {name: options.get(name, None) for name in known}
    for name in ("prop_attn", "protect_cls", "trace_source"):
        opts[name] = _check_bool(name, known[name].default if options.get(name) is None else options[name])
    protected = target.special_tokens if opts["protect_cls"] else 0

    threshold = opts.get("threshold")
    r = options.get("r")
    if spec.threshold_mode and threshold is not None and r is not None:
        raise TokenMergeError("give either r or threshold, not both: r merges a fixed count, threshold adapts it.")
    if threshold is not None:
        opts["thresholds"] = _thresholds(threshold, layers)
        opts["r"] = None
    else:
        if r is None:
            hint = " or threshold" if spec.threshold_mode else ""
            raise TokenMergeError(f"method {spec.name!r} needs r{hint} (how many tokens to merge per layer).")
        # Format and per-layer values; against the real token count when the config fixes it
        # (vision), else against the longest input (text) -- each forward re-checks its own length.
        tokens = target.num_tokens or target.max_tokens or 1 << 30
        schedule = parse_r(r, layers, tokens, protected=protected)
        if spec.check_schedule is not None:
            spec.check_schedule(schedule, tokens, protected)
        opts["r"] = r
    if "margin" in known and opts.get("margin") is not None:
        opts["margin"] = _check_unit_interval("margin", opts["margin"])
    if "alpha" in known:
        alpha = known["alpha"].default if opts.get("alpha") is None else opts["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha >= 0):
            raise TokenMergeError(f"alpha={alpha!r} must be a finite number >= 0.")
        opts["alpha"] = float(alpha)
    return opts


# --------------------------------------------------------------------------- patch checks


def _owner(module) -> TokenMergeHandle | None:
    """The handle whose patched ``forward`` sits on ``module``, if any."""
    forward = module.__dict__.get("forward")
    function = getattr(forward, "__func__", forward)
    return getattr(function, _MARK, None)


def _check_foreign(target: EncoderTarget) -> list[TokenMergeHandle]:
    """Refuse a model patched by another tool; return our own earlier handles on it."""
    ours: list[TokenMergeHandle] = []
    for name, module in target.model.named_modules():
        if hasattr(module, "_tome_info"):
            where = name or type(target.model).__name__
            raise TokenMergeError(
                f"{where} has a _tome_info attribute: the model is already patched by ToMe/tomesd; "
                "load it afresh or remove that patch first."
            )
    for index, layer in enumerate(target.layers):
        if type(layer) is not target.layer_class:
            raise TokenMergeError(
                f"layer {index} is a {type(layer).__name__}, not a {target.layer_class.__name__}: another tool "
                "has replaced its class (a token-merging patch?); load the model afresh."
            )
        for name, module in layer.named_modules():
            if "forward" not in module.__dict__:
                continue
            owner = _owner(module) if module is layer else None
            if owner is not None:
                if owner not in ours:
                    ours.append(owner)
                continue
            where = f"layer {index}" + (f".{name}" if name else "")
            extra = " (accelerate hooks: load without device_map)" if hasattr(module, "_hf_hook") else ""
            raise TokenMergeError(
                f"{where} of the {type(target.model).__name__} has a replaced forward method{extra}: it is already "
                "patched by another tool; load the model afresh."
            )
    return ours


def _check_runtime(target: EncoderTarget) -> None:
    impl = getattr(target.config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise TokenMergeError(
            f"token merging needs attn_implementation 'eager' or 'sdpa' (it passes a float attention bias); "
            f"this {type(target.model).__name__} uses {impl!r}."
        )
    if any(getattr(layer, "gradient_checkpointing", False) for layer in target.layers):
        raise TokenMergeError(
            "token merging does not support gradient checkpointing (the recomputed layers would merge twice); "
            "disable it with model.gradient_checkpointing_disable()."
        )


# --------------------------------------------------------------------------- apply


def apply(model, method: str = "tome", **options) -> TokenMergeHandle:
    """Patch a transformers encoder to merge tokens; returns a handle with ``.remove()``.

    Args:
        model: a supported model (:func:`supported_classes`): BERT (BertModel, the
            all-MiniLM sentence encoder, BertForSequenceClassification, ...), ViT,
            DeiT, CLIP's vision tower (CLIPVisionModel, or CLIPModel's vision side).
        method: ``"tome"`` (or another name from :func:`methods`).
        r: tokens merged per layer -- an int, a list (one per layer) or a pair
            ``(r, inflection)``; see :func:`core.tokens.bipartite.parse_r`.
        threshold: instead of r, merge every pair above this key cosine similarity
            (in [-1, 1]; a number or one per layer). Exactly one of r / threshold.
        prop_attn: proportional attention (default True).
        protect_cls: never merge the class token(s) (default True).
        trace_source: keep the dense source matrix for visualisation (default False).

    Diffusers UNets and pipelines take ``method="tomesd"`` or ``method="todo"``
    instead (:func:`core.tokens.diffusion.apply`, which documents their options); they
    return a :class:`~core.tokens.diffusion.DiffusionTokenMergeHandle` with the same
    ``remove()`` and ``stats``.

    Returns:
        A :class:`TokenMergeHandle`. Applying again replaces the previous patch.

    Raises:
        TokenMergeError: unsupported model, unknown option, value out of range, a model
            patched by another tool. The model is unchanged when it is raised.
    """
    _ensure_builtin_methods()
    if method not in _METHODS:
        raise TokenMergeError(f"method={method!r} is not a token-merging method; use one of {', '.join(_METHODS)}.")
    spec = _METHODS[method]
    if spec.apply_fn is not None:
        return spec.apply_fn(model, **options)
    target = _find_target(model)
    opts = _validate(spec, target, options)
    _check_runtime(target)
    previous = _check_foreign(target)
    matcher = spec.make_matcher(opts, len(target.layers))
    # Everything is validated: only now is anything changed.
    for handle in previous:
        handle.remove()
    handle = TokenMergeHandle(target, spec, opts, matcher)
    handle._patch()
    return handle


# --------------------------------------------------------------------------- the handle


class _Pass:
    """The state of one forward pass through the patched encoder.

    ``size [B, N, 1]`` (None until a merge), ``valid [B, N]`` bool (None: all tokens
    real; False on padding and threshold-mode pad slots), ``assignment [B, N_input]``
    (None until a merge), ``bias`` the mask layers get once something merged,
    ``layer_assignments`` the assignment after each layer (None before the first merge).
    """

    __slots__ = (
        "assignment",
        "batch",
        "bias",
        "input_tokens",
        "layer_assignments",
        "merge_seconds",
        "merged",
        "occupied",
        "schedule",
        "size",
        "tokens",
        "valid",
    )

    def __init__(self, batch: int, tokens: int, schedule, valid):
        self.batch = batch
        self.input_tokens = tokens
        self.schedule = schedule
        self.size = None
        self.valid = valid
        self.assignment = None
        self.occupied = None  # [B] tokens per sample (threshold mode), None: all equal the width
        self.bias = None
        self.merged = False
        self.tokens: list = []
        self.layer_assignments: list = []
        self.merge_seconds = 0.0


class TokenMergeHandle:
    """A token-merging patch on one model: ``remove()``, ``stats``, ``sources``, ``unmerge()``.

    Usable as a context manager (``with apply(model, r=8): ...`` removes it on exit).

    Attributes:
        method: the method name; ``options``: the validated options.
        active: False once removed (or replaced by a later :func:`apply`).
    """

    def __init__(self, target: EncoderTarget, spec: MethodSpec, options: dict, matcher: Callable):
        self.target = target
        self.method = spec.name
        self._spec = spec
        self.options = {k: v for k, v in options.items() if k != "thresholds"}
        self._opts = options
        self._matcher = matcher
        self._protected = target.special_tokens if options["protect_cls"] else 0
        self._threshold_mode = options.get("thresholds") is not None
        self._hooks: list = []
        self._patched: list = []
        self._keys = None
        self._pass: _Pass | None = None
        self._last: _Pass | None = None
        self._last_width: int | None = None
        self._schedules: dict = {}
        self.active = False

    @property
    def model(self):
        return self.target.model

    # ------------------------------------------------------------------ patch / remove

    def _patch(self) -> None:
        try:
            for index, (layer, key_module) in enumerate(zip(self.target.layers, self.target.key_modules)):
                function = self.target.make_forward(self, index)
                setattr(function, _MARK, self)
                # An instance attribute: nn.Module.__call__ finds it before the class's
                # forward, and deleting it restores the class's own function exactly.
                layer.forward = types.MethodType(function, layer)
                self._patched.append(layer)
                self._hooks.append(key_module.register_forward_hook(self._keep_keys))
        except BaseException:
            self.remove()
            raise
        self.active = True

    def remove(self) -> None:
        """Undo the patch: the model's modules are exactly as they were before :func:`apply`."""
        for hook in self._hooks:
            hook.remove()
        for layer in self._patched:
            forward = layer.__dict__.get("forward")
            if forward is not None and getattr(getattr(forward, "__func__", None), _MARK, None) is self:
                del layer.__dict__["forward"]
        self._hooks.clear()
        self._patched.clear()
        self._keys = None
        self._pass = None
        self.active = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        shown = {k: v for k, v in self.options.items() if v is not None}
        return f"TokenMergeHandle({self.method}, {type(self.model).__name__}, {shown}, {state})"

    # ------------------------------------------------------------------ results

    @property
    def stats(self) -> dict:
        """Figures of the last completed forward.

        ``tokens_per_layer``: tokens entering each layer (ints; in threshold mode the
        per-sample mean, a float, not counting the pad slots of samples that merged
        more than others); ``output_tokens``: tokens leaving the encoder (same rules);
        ``merge_seconds``: wall time spent computing the metric, matching and merging
        (on a GPU this is launch time unless the device was synchronised);
        ``tokens_per_sample`` (threshold mode): per layer, each sample's count;
        ``output_tokens_per_sample`` (threshold mode): each sample's count after the last layer.
        """
        last = self._last
        mode = "threshold" if self._threshold_mode else "r"
        out = {"method": self.method, "mode": mode, "layers": len(self.target.layers)}
        if last is None:
            return {**out, "tokens_per_layer": [], "output_tokens": None, "merge_seconds": 0.0, "batch_size": None}
        if self._threshold_mode:
            per_sample = [t if isinstance(t, list) else [t] * last.batch for t in last.tokens]
            out["tokens_per_sample"] = per_sample[:-1]
            out["output_tokens_per_sample"] = per_sample[-1]
            means = [sum(t) / len(t) for t in per_sample]
        else:
            means = list(last.tokens)
        out.update(
            tokens_per_layer=means[:-1],
            output_tokens=means[-1],
            input_tokens=last.input_tokens,
            merge_seconds=last.merge_seconds,
            batch_size=last.batch,
        )
        return out

    @property
    def assignment(self) -> Tensor | None:
        """``[B, N_input]`` int64: the output token that covers each input token (last forward).

        None before the first forward or when nothing merged.
        """
        return None if self._last is None else self._last.assignment

    @property
    def layer_assignments(self) -> list[Tensor | None]:
        """Per layer ``i`` of the last forward, the ``[B, N_input]`` int64 assignment after its merge.

        Entry ``i`` maps each input token to the token that covers it when layer ``i``
        hands over to layer ``i + 1`` (the last entry equals :attr:`assignment`); None
        for the layers before the first merge (the identity). Always kept: one
        reference per layer to the tensor each merge builds anyway (``B * N_input``
        integers per merging layer). Empty before the first forward.
        """
        return [] if self._last is None else list(self._last.layer_assignments)

    @property
    def sizes(self) -> Tensor | None:
        """``[B, N_out, 1]``: how many input tokens each output token stands for (None: all 1)."""
        return None if self._last is None else self._last.size

    @property
    def valid(self) -> Tensor | None:
        """``[B, N_out]`` bool: False on padding and pad slots (None: every output token is real)."""
        return None if self._last is None else self._last.valid

    @property
    def sources(self) -> Tensor | None:
        """The dense 0/1 source matrix ``[B, N_out, N_input]`` of the last forward.

        Only with ``trace_source=True`` (None otherwise); row ``j`` marks the input
        tokens output token ``j`` covers. Built from :attr:`assignment` on request.
        """
        last = self._last
        if last is None or not self._opts["trace_source"]:
            return None
        import torch

        from core.tokens.bipartite import source_from_assignment

        if last.assignment is None:
            return torch.eye(last.input_tokens).expand(last.batch, -1, -1)
        return source_from_assignment(last.assignment, self._last_width)

    def unmerge(self, hidden: Tensor) -> Tensor:
        """Map ``[B, N_out, ...]`` from the last forward back to ``[B, N_input, ...]``.

        Every input token receives a copy of the output token that covers it (exact, no
        arithmetic). Then the usual per-token code applies, e.g. a masked mean over the
        input's attention mask equals :func:`core.tokens.text.mean_pool`.
        """
        last = self._last
        if last is None:
            raise ValueError("unmerge needs a forward pass through the patched model first.")
        width = self._last_width
        if hidden.dim() < 2 or hidden.shape[0] != last.batch or hidden.shape[1] != width:
            raise ValueError(
                f"unmerge expects [{last.batch}, {width}, ...] (the last forward's output), got {list(hidden.shape)}."
            )
        if last.assignment is None:
            return hidden
        from core.tokens.bipartite import unmerge_to_input

        return unmerge_to_input(hidden, last.assignment)

    # ------------------------------------------------------------------ runtime

    def _keep_keys(self, module, args, output) -> None:
        """Forward hook on the key projection: remember ``[B, N, heads * head_dim]`` for the metric."""
        self._keys = output

    def _schedule(self, tokens: int, valid) -> list[int]:
        """The fixed-r schedule for an input of ``tokens``, validated for every sample's real length."""
        lengths = None
        if valid is not None:
            import torch

            counts = valid.sum(1)
            prefix = torch.arange(tokens, device=valid.device)[None, :] < counts[:, None]
            # Right padding (the tokenizers' default): each sample's real tokens are a
            # prefix and its merges are exactly those it would make alone, so it must
            # accept r with its own length. Other layouts are checked at each merge.
            if bool((prefix == valid).all()):
                lengths = tuple(sorted(set(counts.tolist())))
        key = (tokens, lengths)
        if key not in self._schedules:
            layers = len(self.target.layers)
            schedule = parse_r(self._opts["r"], layers, tokens, protected=self._protected)
            if self._spec.check_schedule is not None:
                self._spec.check_schedule(schedule, tokens, self._protected)
            for length in lengths or ():
                try:
                    parse_r(self._opts["r"], layers, max(length, 1), protected=min(self._protected, max(length, 1)))
                    if self._spec.check_schedule is not None:
                        self._spec.check_schedule(schedule, max(length, 1), min(self._protected, length))
                except TokenMergeError as error:
                    raise TokenMergeError(
                        f"a sample of this batch has {length} real tokens (the rest is padding), too few for "
                        f"this r: {error}"
                    ) from None
            self._schedules[key] = schedule
        return self._schedules[key]

    def _enter(self, index: int, hidden: Tensor, mask):
        """Top of patched layer ``index``: returns the attention mask the layer must use.

        Layer 0 starts a pass: it reads which tokens are real from the layer's mask
        and validates r for this input. Until something has merged the layer's own
        mask is returned untouched (so r = 0 is bit-exact); afterwards our bias
        ``[B, 1, 1, N]``: log(size) (proportional attention) and the dtype's minimum
        on padding and pad slots, or None when there is nothing to add.
        """
        if index == 0:
            _check_runtime(self.target)
            batch, tokens = hidden.shape[0], hidden.shape[1]
            valid = _key_validity(mask, batch, tokens)
            schedule = None if self._threshold_mode else self._schedule(tokens, valid)
            self._pass = _Pass(batch, tokens, schedule, valid)
        state = self._pass
        if state is None:
            raise RuntimeError("a token-merging layer ran before layer 0 of its encoder; call the model, not a layer.")
        state.tokens.append(state.occupied if state.occupied is not None else hidden.shape[1])
        return state.bias if state.merged else mask

    def _merge(self, index: int, x: Tensor) -> Tensor:
        """After the attention block of layer ``index``: ``x [B, N, C] -> [B, N - r, C]``."""
        state = self._pass
        keys, self._keys = self._keys, None
        amount = self._opts["thresholds"][index] if self._threshold_mode else state.schedule[index]
        if not self._threshold_mode and amount == 0:
            return self._leave(index, x)
        start = time.perf_counter()
        import torch

        from core.tokens.bipartite import merge_assignment, merge_wavg

        batch, tokens = x.shape[0], x.shape[1]
        if keys is None or keys.shape[:2] != (batch, tokens):
            raise RuntimeError(f"layer {index}: the key projection did not run on this layer's tokens.")
        # ToMe's metric: the keys averaged over heads, [B, N, H*d] -> [B, N, H, d] -> [B, N, d].
        metric = keys.detach().reshape(batch, tokens, self.target.num_heads, -1).mean(dim=2)
        if state.valid is None:
            protected = self._protected
        else:
            # Padding and pad slots never merge and are never merged into.
            protected = ~state.valid
            protected[:, : self._protected] = True
        try:
            merge = self._matcher(metric, index, amount, protected)
        except TokenMergeError as error:
            raise TokenMergeError(f"at layer {index}: {error}") from None
        if not merge.is_identity:
            x, state.size = merge_wavg(merge, x, state.size)
            if state.valid is not None:
                # A merged token is real if any of its sources was; pad slots are 0 -> False.
                state.valid = merge.merge(state.valid.to(x.dtype)[..., None], mode="amax")[..., 0] > 0
            elif merge.valid is not None:
                state.valid = merge.valid
            state.assignment = merge_assignment(merge, state.assignment)
            if self._threshold_mode:
                occupied = state.occupied if state.occupied is not None else torch.full_like(merge.counts, tokens)
                state.occupied = occupied - merge.counts
            state.bias = self._bias(state, x)
            state.merged = True
        state.merge_seconds += time.perf_counter() - start
        return self._leave(index, x)

    def _leave(self, index: int, x: Tensor) -> Tensor:
        # A reference, not a copy: every merge builds a new assignment tensor.
        self._pass.layer_assignments.append(self._pass.assignment)
        if index == len(self.target.layers) - 1:
            state = self._pass
            state.tokens.append(state.occupied if state.occupied is not None else x.shape[1])
            if self._threshold_mode:
                state.tokens = [t.tolist() if not isinstance(t, int) else t for t in state.tokens]
            self._last_width = x.shape[1]
            self._last, self._pass = state, None
        return x

    def _bias(self, state: _Pass, x: Tensor):
        """The additive attention mask ``[B, 1, 1, N]`` for the layers after a merge (or None)."""
        import torch

        from core.tokens.bipartite import attention_bias_from_size

        bias = attention_bias_from_size(state.size).to(x.dtype) if self._opts["prop_attn"] else None
        if state.valid is not None:
            if bias is None:
                bias = x.new_zeros(x.shape[0], 1, 1, x.shape[1])
            # The dtype's minimum, as transformers' own padding masks: -inf would turn a
            # fully masked row into NaN, and pad slots have log(0) = -inf to replace.
            bias = bias.masked_fill(~state.valid[:, None, None, :], torch.finfo(x.dtype).min)
        return bias


def _key_validity(mask, batch: int, tokens: int):
    """``[B, N]`` bool of the keys a layer's attention mask lets through, or None if all.

    Accepts what transformers passes to encoder layers: None, a bool mask (True =
    attend) or an additive float mask (the dtype's minimum = masked), ``[B or 1, 1 or
    heads, Q, N]``. Only padding masks are meaningful once tokens merge, so a mask whose
    rows differ (some query sees keys another does not) is refused.
    """
    if mask is None:
        return None
    import torch

    if mask.dim() != 4 or mask.shape[-1] != tokens:
        raise TokenMergeError(
            f"token merging expects a padding attention mask [B, 1, Q, {tokens}], got shape {list(mask.shape)}."
        )
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(batch, -1, -1, -1).reshape(batch, -1, tokens)
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise TokenMergeError(
            "token merging supports padding masks only (every query sees the same keys); this attention mask "
            "has per-query structure."
        )
    valid = allowed[:, 0]
    if bool(valid.all()):
        return None
    return valid.clone()
