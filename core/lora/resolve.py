"""Match a LoRA's modules to a model's weight tensors, from headers only.

Every module must land on exactly one tensor (or one row slice of OpenCLIP's
fused q/k/v) whose shape fits its update; otherwise the merge is refused with
one sentence naming the LoRA key, before any weight is read. A linear update
fits a 1x1 convolution and the other way round (SD 1.x stores ``proj_in`` as a
1x1 conv where SD 2.x and SDXL use a linear layer): the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core.errors import ModelError
from core.io.formats import ModelSource
from core.lora.formats import KOHYA, LoraFile, LoraModule
from core.lora.names import ModelIndex, Target

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class Application:
    """One LoRA module applied to one model tensor (or a row slice of it)."""

    lora: int  # index into the list of LoRAs
    module: LoraModule
    target: Target

    def region_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows = self.target.rows
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def fits(delta: tuple[int, ...], region: tuple[int, ...]) -> bool:
    """Same shape, or a linear [out, in] against a 1x1 conv [out, in, 1, 1] (either way)."""
    if delta == region:
        return True
    return (
        delta[:2] == region[:2]
        and len(delta) >= 2
        and len(region) >= 2
        and all(d == 1 for d in delta[2:])
        and all(d == 1 for d in region[2:])
    )


def resolve(lora: LoraFile, index: int, model: ModelSource, model_index: ModelIndex) -> list[Application]:
    """Every module of ``lora`` matched to its tensor; ModelError naming the key otherwise."""
    applications: list[Application] = []
    unmatched: list[LoraModule] = []
    for module in lora.modules.values():
        if lora.format == KOHYA:
            component = module.component
            assert component is not None
            targets = model_index.resolve_kohya(component, module.stem)
        else:
            targets = model_index.resolve_peft(module.name)
        if not targets:
            unmatched.append(module)
            continue
        if len(targets) > 1 and len({t.tensor for t in targets}) > 1:
            names = ", ".join(sorted({f"'{t.tensor}'" for t in targets})[:3])
            raise ModelError(
                f"LoRA {lora.path}: key '{module.down}' matches several tensors of {model.path} ({names}); "
                "it is ambiguous."
            )
        applications.append(Application(index, module, targets[0]))
    if unmatched:
        more = f" ({len(unmatched)} of its {len(lora.modules)} modules match nothing)" if len(unmatched) > 1 else ""
        raise ModelError(
            f"LoRA {lora.path}: key '{unmatched[0].down}' matches no module of {model.path}{more}; "
            "is it a LoRA for another model?"
        )
    for app in applications:
        _check_shape(lora, model, app)
    return applications


def _check_shape(lora: LoraFile, model: ModelSource, app: Application) -> None:
    info = model.tensors[app.target.tensor]
    if info.dtype not in FLOAT_DTYPES:
        raise ModelError(
            f"LoRA {lora.path}: module '{app.module.name}' targets '{info.name}' of {model.path}, "
            f"which holds {info.dtype} values, not floating-point weights."
        )
    copy = lora.base_copies.get(app.module.name)
    if copy is not None and lora.tensors[copy].shape != info.shape:
        raise ModelError(
            f"LoRA {lora.path}: '{copy}' (its copy of the base layer) has shape {list(lora.tensors[copy].shape)} "
            f"but '{info.name}' of {model.path} has {list(info.shape)}; the LoRA was made for another model."
        )
    region = app.region_shape(info.shape)
    if not fits(app.module.delta_shape, region):
        where = "" if app.target.rows is None else f" (rows {app.target.rows[0]}:{app.target.rows[1]})"
        raise ModelError(
            f"LoRA {lora.path}: module '{app.module.name}' makes an update of shape {list(app.module.delta_shape)} "
            f"but tensor '{info.name}'{where} of {model.path} has shape {list(region)}; "
            "the LoRA does not fit this model."
        )


def overlapping(applications: list[Application]) -> Optional[tuple[Application, Application]]:
    """Two modules of the same LoRA writing to the same place (a broken file), if any."""
    seen: dict[tuple[int, str, Optional[tuple[int, int]]], Application] = {}
    for app in applications:
        key = (app.lora, app.target.tensor, app.target.rows)
        if key in seen:
            return seen[key], app
        seen[key] = app
    return None
