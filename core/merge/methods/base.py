"""What a merge method is: its parameter schema and its per-tensor kernel.

Every method declares, for the GUI and for validation, its name, display name,
paper link, whether it takes a base model, how many models it accepts and each
parameter's type, default, range and help text. The kernel receives one
:class:`TensorInputs` (the same tensor from every input model) and returns the
merged tensor. Kernels never see files, recipes or Qt.

torch is imported inside kernels only, so ``import core.merge.methods`` stays
cheap (the CLI's ``methods`` subcommand and the GUI's method picker need the
schemas, not torch).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from core.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

REQUIRED = object()
"""Sentinel default of a parameter the recipe must set."""

# Where a parameter is bound.
GLOBAL = "global"  # one value per tensor, from `parameters:` at recipe/slice level
MODEL = "model"  # one value per input model, base model included
NON_BASE = "non_base"  # one value per input model except the base model

# How a method treats a base model.
BASE_REQUIRED = "required"
BASE_OPTIONAL = "optional"
BASE_IGNORED = "ignored"  # no special role: a base_model of a models: recipe is one more input, as in mergekit


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method, as the GUI and the validator see it.

    ``minimum``/``maximum`` are inclusive unless ``exclusive_minimum`` is set
    (``density`` lives in (0, 1]). ``kind`` is one of float, int, bool, str.
    """

    name: str
    kind: type
    default: Any
    help: str
    scope: str = GLOBAL
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    choices: Optional[tuple[str, ...]] = None
    # Typical span for a GUI slider. Unlike minimum/maximum it is not enforced:
    # mergekit accepts e.g. slerp t outside [0, 1] (extrapolation), and recipes
    # that run in mergekit must stay valid here.
    slider: Optional[tuple[float, float]] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.minimum is None and self.maximum is None:
            return "any value"
        low = "(" if self.exclusive_minimum else "["
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        close = ")" if self.maximum is None else "]"
        return f"{low}{lo}, {hi}{close}"

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` converted to ``kind``; raise RecipeError naming ``where``."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise RecipeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}.")
        if self.kind is str:
            value = str(value)
            if self.choices and value not in self.choices:
                raise RecipeError(
                    f"{where}: parameter '{self.name}' must be {self.range_text()}, got {value!r}."
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}.")
        try:
            number = float(value)
        except ValueError:
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise RecipeError(f"{where}: parameter '{self.name}' must be a finite number, got {value!r}.")
        too_low = self.minimum is not None and (
            number <= self.minimum if self.exclusive_minimum else number < self.minimum
        )
        too_high = self.maximum is not None and number > self.maximum
        if too_low or too_high:
            raise RecipeError(
                f"{where}: parameter '{self.name}' = {value!r} is outside its range {self.range_text()}."
            )
        if self.kind is int:
            if number != int(number):
                raise RecipeError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}.")
            return int(number)
        return number

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": None if self.required else self.default,
            "required": self.required,
            "scope": self.scope,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "exclusive_minimum": self.exclusive_minimum,
            "choices": list(self.choices) if self.choices else None,
            "slider": list(self.slider) if self.slider else None,
            "help": self.help,
        }


@dataclass
class TensorInputs:
    """The same tensor from every input model, with its resolved parameters.

    ``tensors[i]`` comes from input ``i`` (recipe order; a base model that is not
    listed among the models is appended last, as mergekit does). All tensors have
    the same shape and dtype. ``model_params[i]`` holds the MODEL-scope values of
    input ``i`` and, for non-base inputs, the NON_BASE ones too. ``model_keys[i]``
    is a stable identifier of the input (its path), used to derive random streams.
    Kernels must not modify the input tensors in place.
    """

    name: str
    tensors: list["torch.Tensor"]
    base_index: Optional[int]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    model_keys: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def base(self) -> Optional["torch.Tensor"]:
        return None if self.base_index is None else self.tensors[self.base_index]

    def non_base_indices(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]

    def generator(self, index: int, purpose: str = "") -> "torch.Generator":
        """A torch.Generator seeded from (seed, tensor name, input, purpose).

        The stream depends only on these values, never on the order in which
        tensors are processed or on the thread count, so a seed reproduces a merge.
        The generator lives on the CPU; kernels draw on the CPU and move the result.
        """
        import torch

        key = self.model_keys[index] if index < len(self.model_keys) else str(index)
        digest = hashlib.blake2b(
            f"{self.seed}\0{self.name}\0{key}\0{index}\0{purpose}".encode(), digest_size=8
        ).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
        return gen


Kernel = Callable[[TensorInputs], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: schema for the GUI and validator, kernel for the executor."""

    name: str
    display_name: str
    paper: str
    description: str
    kernel: Kernel
    parameters: tuple[Parameter, ...] = ()
    base: str = BASE_IGNORED
    min_models: int = 1
    max_models: Optional[int] = None
    random: bool = False
    # Tensors present in only some inputs: "error" refuses; "passthrough" copies
    # the tensor when exactly one input has it (slerp, passthrough);
    # "passthrough_base" copies it only when that one input is the base
    # (nearswap); "base_or_skip" (model_stock): when fewer than min_models
    # inputs have it, copy the base's if only the base has it, else leave the
    # tensor out; with enough inputs, merge those that have it. These follow
    # mergekit's OptionalTensorPolicy.
    missing_tensors: str = "error"
    # Optional plan-time check of resolved parameters (no tensor data yet); it
    # raises RecipeError naming the tensor, so bad values fail before any read.
    # Called as check(name, params, model_params, base_index).
    check: Optional[Callable[[str, dict, list, Optional[int]], None]] = None
    # Float32 copies of a tensor the kernel holds at its peak, for the preflight
    # memory estimate; None means one per input plus three.
    scratch: Optional[float] = None

    def parameter(self, name: str) -> Optional[Parameter]:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def global_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.scope == GLOBAL)

    @property
    def model_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.scope != GLOBAL)

    def needs_base(self) -> bool:
        return self.base == BASE_REQUIRED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "paper": self.paper,
            "description": self.description,
            "base_model": self.base,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "random": self.random,
            "parameters": [p.to_dict() for p in self.parameters],
        }


def compute_dtype(tensor: "torch.Tensor") -> "torch.dtype":
    """The dtype kernels compute in: float64 stays float64, everything else float32."""
    import torch

    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_same_shapes(inputs: TensorInputs, names: Sequence[str] = ()) -> None:
    """Raise ValueError if input tensors disagree in shape (the planner checks first)."""
    shapes = {tuple(t.shape) for t in inputs.tensors}
    if len(shapes) > 1:
        raise ValueError(f"tensor '{inputs.name}' has different shapes across inputs: {sorted(shapes)}")
