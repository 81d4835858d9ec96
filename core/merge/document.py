"""The recipe being edited: a Qt-free model that the app's recipe editor views.

A :class:`RecipeDocument` holds what a person builds by pointing and clicking:
model slots (one of them may be the base model), a method from the registry,
global and per-model parameter settings, and export settings. It turns into a
mergekit :class:`~core.merge.recipe.Recipe` (and YAML) at any time, and reads
one back, so the YAML view and the editor stay in sync both ways. Every change
emits ``events.changed`` with the part that changed (napari-style: views listen
and redraw; nothing here knows about Qt).

Recipes that the slot editor cannot express (``slices:`` layer stacking) are
kept as they are: ``editable`` is False and only their YAML can be edited.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import RecipeError
from core.events import Event
from core.merge import methods as registry
from core.merge.methods.base import BASE_IGNORED, BASE_REQUIRED, GLOBAL, NON_BASE, MergeMethod, Parameter
from core.merge.recipe import ModelEntry, Recipe, Setting, load_recipe

SLOT_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Starting values of required parameters when a model or method is picked.
# They are written into the recipe (and so visible in the YAML): nothing is implied.
_REQUIRED_START = {"weight": 1.0, "t": 0.5}


@dataclass
class ModelSlot:
    """One model of the recipe."""

    ref: str  # path or HF id, as written in the recipe
    name: str  # what the user sees
    params: dict[str, Setting] = field(default_factory=dict)


@dataclass
class ExportSettings:
    """Where and how the merge is written (not part of the mergekit recipe)."""

    output: str = ""
    shard_size: str = "5GB"
    model_card: bool = True
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False


class RecipeDocument:
    """An editable recipe with change events."""

    def __init__(self) -> None:
        self.events = _Events()
        self.slots: list[ModelSlot] = []
        self.base_index: Optional[int] = None
        self.method_name = "linear"
        self.params: dict[str, Setting] = {}
        self.out_dtype: Optional[str] = None
        self.export = ExportSettings()
        self.source_path: Optional[Path] = None  # the YAML file it came from, for relative model paths
        self._extra: dict[str, Any] = {}  # recipe fields the editor has no widget for (dtype, tokenizer_source, ...)
        self._slices_recipe: Optional[Recipe] = None  # a slices: recipe, kept verbatim
        # Settings a method switch or a base change set aside, so switching back restores them:
        # (slot ref or "", name) -> value.
        self._stash: dict[tuple[str, str], Setting] = {}

    # -- what the editor can do ---------------------------------------------
    @property
    def editable(self) -> bool:
        """False for recipes the slot editor cannot show (``slices:``); edit their YAML."""
        return self._slices_recipe is None

    @property
    def method(self) -> MergeMethod:
        return registry.get(self.method_name)

    def label(self, index: int) -> str:
        """'A', 'B', ... for slot ``index`` (the letters the formula uses)."""
        return SLOT_LETTERS[index] if index < len(SLOT_LETTERS) else f"M{index + 1}"

    def display(self, index: int) -> str:
        """``A (name)``, or ``Base (name)`` for the base model."""
        slot = self.slots[index]
        role = "Base" if index == self.base_index else self.label(index)
        return f"{role} ({slot.name})"

    def add_model(self, ref: str, name: Optional[str] = None, *, as_base: bool = False) -> int:
        """Append a model slot; returns its index. A model already in the recipe is refused."""
        self._require_editable()
        ref = str(ref)
        if any(s.ref == ref for s in self.slots):
            raise RecipeError(f"'{name or ref}' is already in the recipe.")
        slot = ModelSlot(ref, name or Path(ref).name or ref)
        self.slots.append(slot)
        index = len(self.slots) - 1
        if as_base or (self.base_index is None and self._wants_base() and index == 0):
            self.base_index = index
        self._fill_required()
        self.events.changed.emit("slots")
        return index

    def remove_slot(self, index: int) -> None:
        self._require_editable()
        self._check_slot(index)
        removed = self.slots.pop(index)
        self._stash = {k: v for k, v in self._stash.items() if k[0] != removed.ref}
        if self.base_index == index:
            self.base_index = None
        elif self.base_index is not None and self.base_index > index:
            self.base_index -= 1
        self._fill_required()
        self.events.changed.emit("slots")

    def move_slot(self, index: int, to: int) -> None:
        self._require_editable()
        self._check_slot(index)
        to = max(0, min(len(self.slots) - 1, to))
        if to == index:
            return
        base = self.slots[self.base_index] if self.base_index is not None else None
        slot = self.slots.pop(index)
        self.slots.insert(to, slot)
        self.base_index = self.slots.index(base) if base is not None else None
        self.events.changed.emit("slots")

    def set_base(self, index: Optional[int]) -> None:
        """Make slot ``index`` the base model (None: no base)."""
        self._require_editable()
        if index is not None:
            self._check_slot(index)
        self.base_index = index
        self._drop_base_only_params()
        self._restore_stashed()  # a model that is no longer the base gets back what it had
        self._fill_required()
        self.events.changed.emit("slots")

    def set_method(self, name: str) -> None:
        """Switch method, keeping the settings the new method also has."""
        self._require_editable()
        method = registry.get(name)  # RecipeError for an unknown name
        self.method_name = method.name
        known = {p.name for p in method.parameters}
        for key, value in self.params.items():
            self._stash[("", key)] = value
        for slot in self.slots:
            for key, value in slot.params.items():
                self._stash[(slot.ref, key)] = value
        self.params = {p.name: self._stash[("", p.name)] for p in method.global_parameters if ("", p.name) in self._stash}
        for slot in self.slots:
            slot.params = {
                p.name: self._stash[(slot.ref, p.name)] for p in method.model_parameters if (slot.ref, p.name) in self._stash
            }
        if self.base_index is None and self._wants_base() and self.slots:
            self.base_index = 0
        self._drop_base_only_params()
        self._fill_required()
        self.events.changed.emit("method")

    def set_param(self, name: str, value: Setting, slot: Optional[int] = None) -> None:
        """Set a global parameter (``slot`` None) or one model's; None removes the setting."""
        self._require_editable()
        param = self.method.parameter(name)
        if param is None:
            raise RecipeError(f"'{name}' is not a parameter of {self.method_name}.")
        if (param.scope == GLOBAL) != (slot is None):
            where = "the recipe" if param.scope == GLOBAL else "each model"
            raise RecipeError(f"Parameter '{name}' of {self.method_name} is set for {where}.")
        if slot is not None:
            self._check_slot(slot)
            if value is not None and param not in self.slot_parameters(slot):  # removing one is always fine
                raise RecipeError(f"Parameter '{name}' of {self.method_name} is not set for the base model.")
        target = self.params if slot is None else self.slots[slot].params
        if value is None:
            target.pop(name, None)
            # A setting removed on purpose is not brought back by a later method switch.
            self._stash.pop(("" if slot is None else self.slots[slot].ref, name), None)
        else:
            target[name] = copy.deepcopy(value)
        self.events.changed.emit("params")

    def param_value(self, name: str, slot: Optional[int] = None) -> Setting:
        """The setting as the recipe holds it, or the schema default (None if required and unset)."""
        target = self.params if slot is None else self.slots[slot].params
        if name in target:
            return target[name]
        param = self.method.parameter(name)
        return None if param is None or param.required else param.default

    def slot_parameters(self, index: int) -> list[Parameter]:
        """The per-model parameters slot ``index`` takes (the base takes no NON_BASE ones)."""
        return [
            p
            for p in self.method.model_parameters
            if not (p.scope == NON_BASE and index == self.base_index and self.method.base != BASE_IGNORED)
        ]

    def set_out_dtype(self, dtype: Optional[str]) -> None:
        self.out_dtype = dtype or None
        self.events.changed.emit("export")

    def set_export(self, **values: Any) -> None:
        for key in values:  # check every name first: an unknown one changes nothing
            if not hasattr(self.export, key):
                raise RecipeError(f"'{key}' is not an export setting.")
        for key, value in values.items():
            setattr(self.export, key, value)
        self.events.changed.emit("export")

    # -- recipe and YAML ------------------------------------------------------
    def to_recipe(self) -> Recipe:
        """A mergekit recipe of the current state (a fresh object the caller may keep)."""
        if self._slices_recipe is not None:
            recipe = copy.deepcopy(self._slices_recipe)
            recipe.out_dtype = self.out_dtype
            recipe.source_path = self.source_path
            return recipe
        if not self.slots:
            raise RecipeError("The recipe has no models yet: add some from the library.")
        base = self.slots[self.base_index].ref if self.base_index is not None else None
        models = [ModelEntry(s.ref, copy.deepcopy(s.params)) for s in self.slots]
        recipe = Recipe(
            merge_method=self.method_name,
            base_model=base,
            models=models,
            parameters=copy.deepcopy(self.params),
            out_dtype=self.out_dtype,
            source_path=self.source_path,
            **copy.deepcopy(self._extra),
        )
        return recipe

    def to_yaml(self) -> str:
        if not self.slots and self._slices_recipe is None:
            return ""
        return self.to_recipe().to_yaml()

    def load_yaml(self, text: str, *, source_path: Optional[Path] = None, names: Optional[dict[str, str]] = None) -> None:
        """Replace the recipe with ``text`` (mergekit YAML); on error nothing changes."""
        where = source_path if source_path is not None else Path("recipe.yaml")
        recipe = load_recipe(where, text=text)
        recipe.source_path = source_path if source_path is not None else self.source_path
        self.load_recipe(recipe, names=names)

    def load_recipe(self, recipe: Recipe, *, names: Optional[dict[str, str]] = None) -> None:
        """Replace the state with ``recipe``; ``names`` maps refs to display names."""
        registry.get(recipe.merge_method)  # an unknown method is refused before anything changes
        names = names or {}
        self.source_path = recipe.source_path
        self.out_dtype = recipe.out_dtype
        self._extra = {
            k: getattr(recipe, k)
            for k in ("dtype", "tokenizer_source", "tokenizer", "chat_template", "vae", "drop", "ema")
            if getattr(recipe, k) is not None
        }
        self._stash = {}
        if recipe.slices is not None:
            self._slices_recipe = copy.deepcopy(recipe)
            self.method_name = recipe.merge_method
            self.slots = [ModelSlot(r, names.get(r, Path(r).name or r)) for r in recipe.model_refs()]
            self.base_index = None
            self.params = copy.deepcopy(recipe.parameters)
            self.events.changed.emit("all")
            return
        self._slices_recipe = None
        self.method_name = recipe.merge_method
        self.params = copy.deepcopy(recipe.parameters)
        self.slots = [
            ModelSlot(e.model, names.get(e.model, Path(e.model).name or e.model), copy.deepcopy(e.parameters))
            for e in recipe.models or []
        ]
        self.base_index = None
        if recipe.base_model:
            refs = [s.ref for s in self.slots]
            if recipe.base_model not in refs:
                # mergekit merges an unlisted base as one more input: list it, so the slots show every input.
                base_name = names.get(recipe.base_model, Path(recipe.base_model).name or recipe.base_model)
                self.slots.append(ModelSlot(recipe.base_model, base_name))
                refs.append(recipe.base_model)
            self.base_index = refs.index(recipe.base_model)
        self.events.changed.emit("all")

    def clear(self) -> None:
        self.slots = []
        self.base_index = None
        self.method_name = "linear"
        self.params = {}
        self.out_dtype = None
        self._extra = {}
        self._slices_recipe = None
        self._stash = {}
        self.source_path = None
        self.events.changed.emit("all")

    # -- workspace state (sessions) -------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "yaml": self.to_yaml(),
            "names": {s.ref: s.name for s in self.slots},
            "export": asdict(self.export),
            "source_path": str(self.source_path) if self.source_path else None,
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`to_state` saved; a recipe that no longer parses raises RecipeError."""
        export = ExportSettings(**{k: v for k, v in (state.get("export") or {}).items() if hasattr(ExportSettings, k)})
        source = Path(state["source_path"]) if state.get("source_path") else None
        text = state.get("yaml") or ""
        recipe = None
        if text.strip():  # parse first: a recipe that fails leaves the document as it was
            recipe = load_recipe(source if source is not None else Path("recipe.yaml"), text=text)
            recipe.source_path = source
            registry.get(recipe.merge_method)
        self.export = export
        if recipe is not None:
            self.load_recipe(recipe, names=state.get("names") or {})
        else:
            self.clear()
        self.events.changed.emit("export")

    # -- the formula line ------------------------------------------------------
    def formula(self) -> str:
        """What the merge computes, with the models' names: '0.70 × a + 0.30 × b'."""
        from core.merge.formula import formula_text

        return formula_text(self)

    # -- helpers ----------------------------------------------------------------
    def _wants_base(self) -> bool:
        """Only methods that need a base get one picked for them (an optional base is the user's choice)."""
        return self.method.base == BASE_REQUIRED

    def _check_slot(self, index: int) -> None:
        if not 0 <= index < len(self.slots):
            raise RecipeError(f"There is no model slot {index}.")

    def _require_editable(self) -> None:
        if not self.editable:
            raise RecipeError("This recipe uses 'slices:' (layer stacking); edit it in the YAML view.")

    def _drop_base_only_params(self) -> None:
        """The base model takes no per-model 'non-base' parameters (a TIES weight): set them aside."""
        if self.base_index is None or self.method.base == BASE_IGNORED:
            return
        non_base = {p.name for p in self.method.model_parameters if p.scope == NON_BASE}
        slot = self.slots[self.base_index]
        for key in non_base & set(slot.params):
            self._stash[(slot.ref, key)] = slot.params[key]
        slot.params = {k: v for k, v in slot.params.items() if k not in non_base}

    def _restore_stashed(self) -> None:
        """Give each model back the settings set aside for it that it takes again."""
        for i, slot in enumerate(self.slots):
            for p in self.slot_parameters(i):
                if p.name not in slot.params and (slot.ref, p.name) in self._stash:
                    slot.params[p.name] = self._stash[(slot.ref, p.name)]

    def _fill_required(self) -> None:
        """Give required parameters a visible starting value so a new recipe is complete."""
        method = self.method
        for p in method.global_parameters:
            if p.required and p.name not in self.params:
                self.params[p.name] = _start_value(p)
        for i, slot in enumerate(self.slots):
            for p in self.slot_parameters(i):
                if p.required and p.name not in slot.params:
                    slot.params[p.name] = _start_value(p)


def _start_value(p: Parameter) -> Any:
    start = _REQUIRED_START.get(p.name)
    # nearswap's t shares slerp's name but lives in (0, 0.01): a start outside the span would mislead.
    if start is not None and (p.slider is None or p.slider[0] <= start <= p.slider[1]):
        return start
    if p.slider is not None:
        return p.slider[0] + (p.slider[1] - p.slider[0]) / 2
    if p.minimum is not None and p.maximum is not None:
        return (p.minimum + p.maximum) / 2
    return p.kind(0) if p.kind in (int, float) else p.kind()


class _Events:
    def __init__(self) -> None:
        self.changed = Event("changed")  # payload: "slots" | "method" | "params" | "export" | "all"
