"""The streaming merge executor.

Tensors flow one at a time through overlapped stages: the kernel reads the
next op's inputs ahead (posix_fadvise) while the current op is merged from the
memory maps, and a writer thread writes the previous result straight into its
shard. At most two results are in flight, so peak memory is a few tensors,
whatever the model size and shard size. The output is built in a hidden folder beside the target
and renamed into place at the end; cancelling (closing the generator at a
yield) or any error removes it. When every input is a single ``.safetensors``
file and the output's name ends in ``.safetensors``, the output is that one
file (one shard, whatever the shard size; no config, card or recipe files: the
recipe is in its metadata), written in the hidden folder and moved into place.

Stable Diffusion outputs carry, besides our ``mergestudio_recipe``, the
applied block weights (``mergestudio_block_weights``) and, for single-file
checkpoints, A1111's ``sd_merge_recipe`` and ``sd_merge_models``, whose model
hashes are the sha256 of each input file (each input is read once more for it,
unless its hash is cached from an earlier merge: core/io/sd.py cached_sha256).

(The module is ``executor`` rather than ``run`` so that ``core.merge.run`` can
be the function, as the public API promises.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional

from core.errors import MergeStudioError, ModelError
from core.io.tensors import torch_dtype
from core.io.writer import (
    DEFAULT_SHARD_BYTES,
    AtomicOutput,
    OutputTensor,
    ShardedWriter,
    _disk_error,
    plan_shards,
    write_index,
)
from core.jobs import Progress
from core.merge.methods.base import TensorInputs
from core.merge.plan import MergePlan, TensorOp, is_single_file, single_file_output

if TYPE_CHECKING:  # pragma: no cover
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class MergeResult:
    output: Path
    tensors: int
    bytes_written: int
    seconds: float
    device: str
    files: list[str] = field(default_factory=list)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; check explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeStudioError(f"--device {device}: no CUDA GPU is available on this machine.")
    if device != "cpu" and not device.startswith("cuda"):
        raise MergeStudioError(f"--device {device}: use auto, cpu or cuda.")
    return device


@dataclass
class _Component:
    """One output weight set: the whole model, or one diffusers component."""

    folder: Path
    stem: str
    ops: list[TensorOp]
    writer: Optional[ShardedWriter] = None


def iter_merge(
    plan: MergePlan,
    output: Path,
    *,
    device: str = "auto",
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    model_card: bool = True,
    tensor_delay_s: float = 0.0,
) -> Generator[Progress, None, MergeResult]:
    """Run ``plan`` into ``output``, yielding Progress after each tensor.

    Close the generator to cancel: the partial output is removed and an
    existing output is left untouched. ``model_card=False`` skips README.md
    (the recipe stays in mergekit_config.yml and the shard metadata).
    ``tensor_delay_s`` sleeps that long after each tensor: a knob for demos
    and for exercising progress and cancel on tiny models.
    """
    if shard_size <= 0:
        raise MergeStudioError(f"--shard-size must be positive, got {shard_size}.")
    if not (0 <= tensor_delay_s < float("inf")):
        raise MergeStudioError(f"--tensor-delay must be a finite number of seconds >= 0, got {tensor_delay_s}.")
    output = Path(output)
    single = single_file_output(plan, output)
    atomic = AtomicOutput(output, overwrite, single_file=single)
    atomic.check()
    dev = resolve_device(device)
    started = time.monotonic()
    total_bytes = plan.output_bytes
    recipe_yaml = plan.recipe.to_yaml()
    metadata = {"format": "pt", "merge_method": plan.method.name, "mergestudio_recipe": recipe_yaml}
    metadata.update(_sd_metadata(plan, output))

    with atomic as tmp:
        components = _components(plan, tmp)
        if single:
            components[""].stem = output.name[: -len(".safetensors")]
        for comp in components.values():
            comp.folder.mkdir(parents=True, exist_ok=True)
            tensors = [OutputTensor(_inner(op.out_name, plan), op.shape, op.out_dtype) for op in comp.ops]
            limit = sum(t.nbytes for t in tensors) + 1 if single else shard_size
            comp.writer = ShardedWriter(comp.folder, plan_shards(tensors, limit, metadata, comp.stem))
        writer = ThreadPoolExecutor(1, thread_name_prefix="merge-write")
        pending_write: Optional[Future] = None
        done_bytes = 0
        prefetcher = _Prefetcher(plan)
        try:
            ops = plan.ops
            prefetcher.advise(ops[0])
            for i, op in enumerate(ops):
                if i + 1 < len(ops):
                    prefetcher.advise(ops[i + 1])  # the kernel reads it from disk while we compute
                inputs = _load(plan, op, dev)
                result = _compute(plan, op, inputs, seed)
                del inputs
                if pending_write is not None:
                    pending_write.result()  # surfaces write errors; bounds memory to two results
                comp = components[_component_of(op.out_name, plan)]
                pending_write = writer.submit(comp.writer.write, _inner(op.out_name, plan), result)  # type: ignore[union-attr]
                del result
                done_bytes += op.out_bytes
                if tensor_delay_s:
                    time.sleep(tensor_delay_s)
                yield Progress(i + 1, len(ops), done_bytes, total_bytes, time.monotonic() - started, op.out_name)
            if pending_write is not None:
                pending_write.result()
            files: list[str] = []
            for comp in components.values():
                assert comp.writer is not None
                comp.writer.finish()
                write_index(comp.folder, comp.writer.shards, comp.stem)
                files.extend(str((comp.folder / s.file_name).relative_to(tmp)) for s in comp.writer.shards)
            if not single:
                _write_extras(plan, tmp)
                if model_card:
                    _write_card(plan, tmp)
        except OSError as exc:  # a write failed (disk full, quota, permissions): one sentence, not a traceback
            raise _disk_error(atomic.target, exc) from None
        finally:
            prefetcher.close()
            writer.shutdown(wait=True, cancel_futures=True)
            for comp in components.values():
                if comp.writer is not None:
                    comp.writer.abort()
    return MergeResult(output, len(plan.ops), done_bytes, time.monotonic() - started, dev, files)


def _sd_metadata(plan: MergePlan, output: Path) -> dict[str, str]:
    """Block weights applied, and A1111's keys for a single-file SD checkpoint (hashes read each input once)."""
    from core.io import sd
    from core.merge.sd_plan import a1111_recipe_fields

    hooks = plan.hooks
    if hooks is None or not hooks.is_sd:
        return {}
    extra: dict[str, str] = {}
    if plan.block_weights is not None:
        extra["mergestudio_block_weights"] = json.dumps(plan.block_weights)
    if hooks.layout == sd.LDM and all(is_single_file(m.source) for m in plan.inputs):
        records = [
            sd.InputRecord(
                m.source.path.name, sd.cached_sha256(m.source.path), sd.legacy_hash(m.source.path), m.source.metadata
            )
            for m in plan.inputs
        ]
        extra.update(sd.a1111_metadata(records, a1111_recipe_fields(plan, output)))
    return extra


def _components(plan: MergePlan, tmp: Path) -> dict[str, _Component]:
    if plan.models[plan.config_model or 0].source.kind != "diffusers":
        return {"": _Component(tmp, "model", list(plan.ops))}
    source = plan.models[plan.config_model or 0].source
    comps: dict[str, _Component] = {}
    for op in plan.ops:
        name = op.out_name.partition("/")[0]
        if name not in comps:
            files = source.components[name].weight_files if name in source.components else []
            stem = files[0].name.split(".")[0].split("-0")[0] if files else "diffusion_pytorch_model"
            comps[name] = _Component(tmp / name, stem, [])
        comps[name].ops.append(op)
    return comps


def _component_of(out_name: str, plan: MergePlan) -> str:
    if plan.models[plan.config_model or 0].source.kind != "diffusers":
        return ""
    return out_name.partition("/")[0]


def _inner(out_name: str, plan: MergePlan) -> str:
    if plan.models[plan.config_model or 0].source.kind != "diffusers":
        return out_name
    return out_name.partition("/")[2]


class _Prefetcher:
    """Asks the kernel to read the next op's tensors ahead (posix_fadvise WILLNEED).

    Reading ahead costs no CPU in this process, unlike a reader thread, which on
    a small machine competes with the merge arithmetic for the same cores; on
    a cold cache the disk works while the current tensor is merged.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.fds: dict[Path, int] = {}
        self.enabled = hasattr(os, "posix_fadvise")

    def advise(self, op: TensorOp) -> None:
        if not self.enabled:
            return
        for mi, name in op.inputs:
            info = self.plan.models[mi].source.tensors.get(name)
            if info is None or self.plan.models[mi].source.kind == "pickle":
                continue
            try:
                fd = self.fds.get(info.file)
                if fd is None:
                    fd = self.fds[info.file] = os.open(info.file, os.O_RDONLY)
                os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.enabled = False  # advice only; reading works without it

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _finite(tensor: "torch.Tensor") -> bool:
    """True when no element is NaN or Inf.

    torch's min and max propagate NaN, and an Inf is the max or the min, so one
    aminmax pass decides; it is several times cheaper than isfinite() over
    every element or a float32 sum, most of all for bf16.
    """
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _load(plan: MergePlan, op: TensorOp, device: str) -> list["torch.Tensor"]:
    """Read an op's inputs, convert them to the compute dtype and move them."""
    dtype = torch_dtype(op.compute_dtype)
    tensors = []
    for mi, name in op.inputs:
        model = plan.models[mi]
        tensor = model.source.get(name)
        if not op.copy and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if device != "cpu":
            tensor = tensor.to(device, non_blocking=True)
        tensors.append(tensor)
    return tensors


def _compute(plan: MergePlan, op: TensorOp, tensors: list["torch.Tensor"], seed: int) -> "torch.Tensor":
    out_dtype = torch_dtype(op.out_dtype)
    if op.copy:
        result = tensors[0]
    else:
        inputs = TensorInputs(
            name=op.out_name,
            tensors=tensors,
            base_index=op.base_index,
            params=op.params,
            model_params=op.model_params,
            model_keys=[plan.models[mi].ref for mi, _ in op.inputs],
            seed=seed,
        )
        result = plan.method.kernel(inputs)
        if tuple(result.shape) != op.shape:
            raise MergeStudioError(
                f"Tensor '{op.out_name}': method {plan.method.name} returned shape {list(result.shape)}, "
                f"expected {list(op.shape)}."
            )
    if result.is_floating_point() and not _finite(result):
        _refuse_nonfinite(plan, op, tensors)
    if result.dtype != out_dtype:
        result = result.to(out_dtype)
    if result.device.type != "cpu":
        result = result.cpu()
    return result


def _refuse_nonfinite(plan: MergePlan, op: TensorOp, tensors: list["torch.Tensor"]) -> None:
    """Name the input holding NaN/Inf (or blame the method) and stop the merge.

    Only the output is checked on the normal path (one aminmax pass instead of
    one per input): NaN and Inf propagate through the arithmetic, so a bad
    input shows in the output; only then are the inputs examined to say which.
    """
    for (mi, name), tensor in zip(op.inputs, tensors):
        if tensor.is_floating_point() and not _finite(tensor):
            raise ModelError(
                f"Model '{plan.models[mi].ref}': tensor '{name}' contains NaN or Inf values; "
                "a merge would spread them, so it is refused."
            )
    raise MergeStudioError(
        f"Tensor '{op.out_name}': method {plan.method.name} produced NaN or Inf values from finite "
        "inputs (check the recipe's parameters for infinite or huge values); the merge was stopped."
    )


def _write_extras(plan: MergePlan, folder: Path) -> None:
    """config.json, generation config, tokenizer and recipe YAML (the model card: _write_card)."""
    recipe_yaml = plan.recipe.to_yaml()
    config_src = plan.models[plan.config_model or 0].source
    if config_src.kind == "diffusers":
        _copy_pipeline_files(config_src.path, folder)
        vae_config = plan.hooks.vae_config if plan.hooks is not None else None
        if vae_config is not None and vae_config.is_file() and (folder / "vae").is_dir():
            shutil.copy2(vae_config, folder / "vae" / "config.json")  # the VAE baked in brings its config
            _register_vae(folder / "model_index.json")
    else:
        if plan.config is not None:
            (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        src_dir = config_src.path if config_src.path.is_dir() else None
        if src_dir is not None and (src_dir / "generation_config.json").is_file():
            shutil.copy2(src_dir / "generation_config.json", folder / "generation_config.json")
        if plan.tokenizer_model is not None:
            tok_src = plan.models[plan.tokenizer_model].source.path
            if tok_src.is_dir():
                for name in TOKENIZER_FILES:
                    if (tok_src / name).is_file():
                        shutil.copy2(tok_src / name, folder / name)
        _apply_chat_template(plan, folder)
    (folder / "mergekit_config.yml").write_text(recipe_yaml)


def _write_card(plan: MergePlan, folder: Path) -> None:
    """README.md: the model card (method with paper link, models, recipe)."""
    from core.merge.card import model_card

    (folder / "README.md").write_text(model_card(plan))


def _register_vae(index_file: Path) -> None:
    """A VAE added to a pipeline that had none must be listed in model_index.json, or the pipeline won't load it."""
    if not index_file.is_file():
        return
    index = json.loads(index_file.read_text())
    if index.get("vae") in (None, [None, None]):
        index["vae"] = ["diffusers", "AutoencoderKL"]
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def _copy_pipeline_files(src: Path, dst: Path) -> None:
    """Copy a pipeline's non-weight files (model_index.json, configs, tokenizers)."""
    for item in src.rglob("*"):
        if item.is_dir():
            continue
        rel = item.relative_to(src)
        if item.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth") or item.name.endswith(".index.json"):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(item, target)


def _apply_chat_template(plan: MergePlan, folder: Path) -> None:
    template = plan.recipe.chat_template
    if template is None:
        return
    if template == "chatml":
        text = CHATML_TEMPLATE
    elif template == "auto":
        tok_cfg = plan.models[plan.config_model or 0].source.path / "tokenizer_config.json"
        text = _read_template(tok_cfg)
        if text is None:
            return
    elif "{%" in template or "{{" in template:
        text = template
    else:
        raise MergeStudioError(
            f"chat_template: '{template}' is not a Jinja template, 'chatml' or 'auto'."
        )
    (folder / "chat_template.jinja").write_text(text)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        cfg["chat_template"] = text
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _read_template(tok_cfg: Path) -> Optional[str]:
    if tok_cfg.is_file():
        value = json.loads(tok_cfg.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
    jinja = tok_cfg.parent / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None
