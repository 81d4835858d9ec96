"""Module names across the layouts a LoRA may be written for.

Stable Diffusion weights come in two namings: the original (ldm) single-file
one (``model.diffusion_model.input_blocks.1.1.proj_in``) and diffusers'
(``down_blocks.0.attentions.0.proj_in``). kohya LoRAs name UNet modules either
way, underscore-joined (``lora_unet_down_blocks_0_attentions_0_proj_in``), and
text encoders by the Hugging Face CLIP names under ``text_model.`` (which
transformers 5 leaves out of CLIPTextModel's files) even where the checkpoint
holds OpenCLIP's (SD 2.x, SDXL's second encoder), whose q/k/v are one fused
``in_proj_weight``. kohya's sd-scripts writes diffusers UNet names for SD 1.x/2.x
and original (ldm) ones for SDXL; both spellings resolve on either layout. This
module maps between them, using the published UNet layout: with ``L`` resnets
per down block (2 in SD 1.x/2.x and SDXL),

* ``input_blocks.0.0`` = ``conv_in``; ``input_blocks.n`` (n >= 1): block
  ``b, j = divmod(n - 1, L + 1)``: ``.0`` = ``down_blocks.b.resnets.j``, ``.1`` =
  ``down_blocks.b.attentions.j``; ``j == L`` is ``down_blocks.b.downsamplers.0``
  (``.0.op``);
* ``middle_block.0/1/2`` = ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``;
* ``output_blocks.n``: ``b, j = divmod(n, L + 1)``: ``.0`` = ``up_blocks.b.resnets.j``,
  ``.1`` = ``up_blocks.b.attentions.j``, the upsampler ``up_blocks.b.upsamplers.0``
  is ``.1.conv`` in blocks without attentions and ``.2.conv`` in blocks with them;
* resnet parts ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``,
  ``skip_connection`` = ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``,
  ``conv2``, ``conv_shortcut``; ``time_embed.0/2`` = ``time_embedding.linear_1/2``,
  ``label_emb.0.0/2`` = ``add_embedding.linear_1/2``, ``out.0/2`` =
  ``conv_norm_out`` / ``conv_out``.

:class:`ModelIndex` indexes a model's weight tensors under every name a LoRA
may use for them; a LoRA module resolves to a :class:`Target` (a tensor, or a
row slice of OpenCLIP's fused q/k/v) by exact lookup, then by a suffix match of
the underscore-joined path. Ambiguous and unmatched keys are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from core.io.tensors import TensorInfo

# (prefix, component, text-encoder flavour) of the layouts we know; order matters (longest first).
COMPONENT_PREFIXES: tuple[tuple[str, str, Optional[str]], ...] = (
    ("model.diffusion_model.", "unet", None),
    ("cond_stage_model.transformer.", "te1", "hf"),  # SD 1.x: Hugging Face CLIP
    ("cond_stage_model.model.", "te1", "openclip"),  # SD 2.x: OpenCLIP
    ("conditioner.embedders.0.transformer.", "te1", "hf"),  # SDXL: CLIP-L
    ("conditioner.embedders.1.model.", "te2", "openclip"),  # SDXL: OpenCLIP-G
    ("unet/", "unet", None),
    ("text_encoder/", "te1", "hf"),
    ("text_encoder_2/", "te2", "hf"),
)

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_OPENCLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Parts of a Hugging Face CLIP text tower; transformers 5 saves CLIPTextModel without the ``text_model.``
# level that kohya names (and transformers 4 files) carry, CLIPTextModelWithProjection with it.
_CLIP_TOWER = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's update goes: a tensor, or rows [start, stop) of it."""

    tensor: str
    rows: Optional[tuple[int, int]] = None


def underscore(path: str) -> str:
    return path.replace(".", "_").replace("/", "_")


def _replace_head(path: str, table: dict[str, str]) -> Optional[str]:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def _resnet(prefix: str, rest: str, table: dict[str, str]) -> Optional[str]:
    inner = _replace_head(rest, table) if rest else None
    return f"{prefix}.{inner}" if inner is not None else None


def ldm_to_diffusers(path: str, layers: int = 2) -> Optional[str]:
    """An ldm UNet module path (no ``model.diffusion_model.`` prefix) in diffusers naming, or None."""
    top = _replace_head(path, _TOP)
    if top is not None:
        return top
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?(?:\.(.*))?", path)
    if not m:
        return None
    kind, n, k, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    if kind == "middle_block":
        rest = ".".join(x for x in (k, rest) if x)
        if n == 1:
            return f"mid_block.attentions.0.{rest}" if rest else "mid_block.attentions.0"
        return _resnet(f"mid_block.resnets.{n // 2}", rest, _RESNET) if n in (0, 2) else None
    if k is None:
        return None
    k = int(k)
    if kind == "input_blocks":
        if n < 1:
            return None
        block, j = divmod(n - 1, layers + 1)
        if j == layers:
            return f"down_blocks.{block}.downsamplers.0.conv" if (k, rest) == (0, "op") else None
        if k == 0:
            return _resnet(f"down_blocks.{block}.resnets.{j}", rest, _RESNET)
        return f"down_blocks.{block}.attentions.{j}" + (f".{rest}" if rest else "") if k == 1 else None
    block, j = divmod(n, layers + 1)
    if k == 0:
        return _resnet(f"up_blocks.{block}.resnets.{j}", rest, _RESNET)
    if rest == "conv" and k in (1, 2):
        return f"up_blocks.{block}.upsamplers.0.conv"
    return f"up_blocks.{block}.attentions.{j}" + (f".{rest}" if rest else "") if k == 1 else None


def diffusers_to_ldm(path: str, layers: int = 2, attention_up_blocks: Iterable[int] = ()) -> Optional[str]:
    """A diffusers UNet module path in ldm naming, or None (inverse of :func:`ldm_to_diffusers`)."""
    top = _replace_head(path, {v: k for k, v in _TOP.items()})
    if top is not None:
        return top
    back = {v: k for k, v in _RESNET.items()}
    parts = r"(resnets|attentions|downsamplers|upsamplers)"
    m = re.fullmatch(rf"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?{parts}\.(\d+)(?:\.(.*))?", path)
    if not m:
        return None
    kind, block, part, j, rest = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5) or ""
    tail = f".{rest}" if rest else ""
    if kind == "mid_block":
        if block is not None:
            return None
        if part == "attentions" and j == 0:
            return "middle_block.1" + tail
        if part == "resnets" and j in (0, 1):
            return _resnet(f"middle_block.{2 * j}", rest, back)
        return None
    if block is None:
        return None
    b = int(block)
    if kind == "down_blocks":
        n = b * (layers + 1) + j + 1
        if part == "resnets":
            return _resnet(f"input_blocks.{n}.0", rest, back)
        if part == "attentions":
            return f"input_blocks.{n}.1" + tail
        if part == "downsamplers" and j == 0 and rest == "conv":
            return f"input_blocks.{(b + 1) * (layers + 1)}.0.op"
        return None
    n = b * (layers + 1) + j
    if part == "resnets":
        return _resnet(f"output_blocks.{n}.0", rest, back)
    if part == "attentions":
        return f"output_blocks.{n}.1" + tail
    if part == "upsamplers" and j == 0 and rest == "conv":
        slot = 2 if b in set(attention_up_blocks) else 1
        return f"output_blocks.{b * (layers + 1) + layers}.{slot}.conv"
    return None


def kohya_clip_path(path: str) -> str:
    """A Hugging Face CLIP module path as kohya names it: under ``text_model.`` (``encoder.layers.0...`` gains it)."""
    return "text_model." + path if path.startswith(_CLIP_TOWER) else path


def openclip_modules(path: str, width: int) -> list[tuple[str, Target]]:
    """Hugging Face CLIP names of an OpenCLIP weight (``transformer.resblocks.i...``).

    ``in_proj_weight`` [3w, w] is three modules (q, k, v rows); the others are one.
    """
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.*)", path)
    if not m:
        return []
    layer, rest = m.group(1), m.group(2)
    head = f"text_model.encoder.layers.{layer}"
    if rest == "attn.in_proj":
        return [
            (f"{head}.self_attn.{p}_proj", Target("", (i * width, (i + 1) * width)))
            for i, p in enumerate(("q", "k", "v"))
        ]
    mapped = _OPENCLIP.get(rest)
    return [(f"{head}.{mapped}", Target(""))] if mapped else []


def weight_module(name: str) -> Optional[str]:
    """The module path of a weight tensor name ('a.b.weight' -> 'a.b'; OpenCLIP 'x.in_proj_weight' -> 'x.in_proj')."""
    if name.endswith(".weight"):
        return name[: -len(".weight")]
    if name.endswith(".in_proj_weight"):
        return name[: -len("_weight")]
    return None


def split_component(name: str, sd_layout: bool) -> tuple[Optional[str], Optional[str], str, str]:
    """(component, text-encoder flavour, prefix, rest) of a tensor name.

    In an SD layout a name under no LoRA-able prefix has component 'other';
    in any other model (a bare UNet, an LLM) the component is None.
    """
    for prefix, component, flavour in COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component, flavour, prefix, name[len(prefix):]
    return ("other" if sd_layout else None), None, "", name


def is_sd_layout(names: Iterable[str]) -> bool:
    prefixes = tuple(p for p, _, _ in COMPONENT_PREFIXES)
    return any(n.startswith(prefixes) for n in names)


def unet_layers(names: Iterable[str]) -> tuple[int, set[int]]:
    """(resnets per down block, up blocks with attentions), read from tensor names; (2, {}) if unknown."""
    names = list(names)
    ops = {int(m.group(1)) for n in names if (m := re.search(r"input_blocks\.(\d+)\.0\.op\.", n))}
    blocks = {int(m.group(1)) for n in names if (m := re.search(r"input_blocks\.(\d+)\.[01]\.(?!op\.)", n))} - {0}
    resnets = [int(m.group(1)) for n in names if (m := re.search(r"down_blocks\.\d+\.resnets\.(\d+)\.", n))]
    if resnets:
        layers = max(resnets) + 1
    else:
        # ldm: downsamplers sit at multiples of L + 1, resnets and attentions elsewhere.
        # Every SD model has L = 2; take the first count the names do not contradict.
        layers = next(
            (c for c in (2, 1, 3, 4, 5, 6) if all(n % (c + 1) == 0 for n in ops) and all(n % (c + 1) for n in blocks)),
            2,
        )
    attn = {int(m.group(1)) for n in names if (m := re.search(r"up_blocks\.(\d+)\.attentions\.", n))}
    return max(layers, 1), attn


class ModelIndex:
    """A model's weight tensors under every name a LoRA may give them."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = tensors
        self.sd_layout = is_sd_layout(tensors)
        self.layers, self.attention_up = unet_layers(tensors)
        # (component, underscore stem) -> targets; "full" keeps each tensor's whole underscore path.
        self.kohya: dict[tuple[Optional[str], str], list[Target]] = {}
        self.full: dict[tuple[Optional[str], str], list[Target]] = {}
        for name, info in tensors.items():
            module = weight_module(name)
            if module is None:
                continue
            component, flavour, _prefix, rest = split_component(module, self.sd_layout)
            if component == "other":
                continue
            for stem, target in self._stems(name, module, component, flavour, rest, info):
                self._add(self.kohya, (component, stem), target)
            self._add(self.full, (component, underscore(module)), Target(name))

    @staticmethod
    def _add(table: dict, key: tuple, target: Target) -> None:
        targets = table.setdefault(key, [])
        if target not in targets:
            targets.append(target)

    def _stems(
        self, name: str, module: str, component: Optional[str], flavour: Optional[str], rest: str, info: TensorInfo
    ) -> list[tuple[str, Target]]:
        stems = [(underscore(rest), Target(name))]
        # a CLIP tower saved without ``text_model.`` (pipeline component or a lone text-encoder folder)
        if flavour != "openclip" and component in ("te1", "te2", None) and kohya_clip_path(rest) != rest:
            stems.append((underscore(kohya_clip_path(rest)), Target(name)))
        if flavour == "openclip" and info.shape:
            width = info.shape[-1] if len(info.shape) == 2 else 0
            stems += [(underscore(path), Target(name, t.rows)) for path, t in openclip_modules(rest, width)]
        if component in ("unet", None):
            if component == "unet" and name.startswith("model.diffusion_model."):
                other = ldm_to_diffusers(rest, self.layers)
            else:
                other = diffusers_to_ldm(rest, self.layers, self.attention_up)
            if other is not None:
                stems.append((underscore(other), Target(name)))
        return stems

    def resolve_kohya(self, component: str, stem: str) -> list[Target]:
        """Targets of a kohya module (component from its prefix, stem without it)."""
        found = list(self.kohya.get((component, stem), [])) + list(self.kohya.get((None, stem), []))
        if found:
            return found
        for (comp, path), targets in self.full.items():
            if comp in (component, None) and (path == stem or path.endswith("_" + stem)):
                found.extend(t for t in targets if t not in found)
        return found

    def resolve_peft(self, module: str) -> list[Target]:
        """Targets of a PEFT module path (a diffusers pipeline's 'unet.x' is 'unet/x')."""
        for candidate in (module, module.replace(".", "/", 1)):
            name = candidate + ".weight"
            if name in self.tensors:
                return [Target(name)]
        return []
