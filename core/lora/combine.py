"""Combine several LoRAs into one, with the engine's own merge methods.

Per module, with LoRA i's weight ``w_i``, scale ``s_i`` and factors ``A_i, B_i``:

* ``linear``: ``ΔW = Σ w_i s_i B_i A_i``. Without ``rank``/``energy`` this is
  written exactly, by concatenating the factors (``A = [A_1; A_2; ...]``,
  ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, split as ``sqrt|w s|`` on each side):
  a LoRA of rank ``Σ r_i``. With ``rank``/``energy`` the same sum is re-factored
  by an SVD of the low-rank product (exact singular values, never the dense
  matrix).
* ``ties``, ``dare_linear``, ``dare_ties``: each LoRA's dense ``ΔW_i = s_i B_i A_i``
  is a task vector from a zero base, merged by the registry's kernel of that
  name (``core.merge.methods.task_arithmetic``: the same trimming, sign
  election and dropping, with its per-tensor seeded generators and default
  parameters, e.g. TIES normalizes by the agreeing weights), then re-factored
  to ``rank`` (or ``energy``) by truncated SVD (``core.lora.factor``). The
  merged update is generally of full rank, so the rank is required.

A module missing from some LoRAs counts as a zero update there. All LoRAs must
have one format; the output has it too (kohya: one ``.safetensors`` file; PEFT:
an adapter folder).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional, Sequence, Union

from core.errors import MergeStudioError, ModelError, RecipeError
from core.jobs import Progress
from core.lora.factor import SVD_CHOICES, check_target, factorize, factorize_product, seeded_generator
from core.lora.formats import KOHYA, PEFT, LoraFile, LoraModule, open_lora, product
from core.lora.output import LoraWriter, atomic_output, output_dtype, peft_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

METHODS = ("linear", "ties", "dare_linear", "dare_ties")
METADATA_KEY = "mergestudio_lora_combine"


@dataclass
class CombineResult:
    output: Path
    method: str
    format: str
    modules: int
    ranks: dict[str, int]
    exact: bool  # True when the output equals the weighted sum exactly (linear without rank/energy)
    errors: dict[str, float] = field(default_factory=dict)  # relative truncation error per module
    seconds: float = 0.0


def _numbers(values: Optional[Union[float, Sequence[float]]], count: int, what: str, default: float) -> list[float]:
    if values is None:
        return [default] * count
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise MergeStudioError(f"--{what}: give one value or one per LoRA ({count}), got {len(values)}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeStudioError(f"--{what}: {v!r} is not a finite number.")
    return [float(v) for v in values]


def iter_combine(
    loras: Sequence[Union[str, Path]],
    output: Union[str, Path],
    *,
    method: str = "linear",
    weights: Optional[Sequence[float]] = None,
    density: Optional[Union[float, Sequence[float]]] = None,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    seed: int = 0,
    dtype: Optional[str] = None,
    svd: str = "auto",
    overwrite: bool = False,
) -> Generator[Progress, None, CombineResult]:
    """Combine ``loras`` into one written at ``output``; yields Progress per module."""
    if method not in METHODS:
        raise MergeStudioError(f"--method {method}: use one of {', '.join(METHODS)}.")
    if svd not in SVD_CHOICES:
        raise MergeStudioError(f"--svd {svd}: use one of {', '.join(SVD_CHOICES)}.")
    check_target(rank, energy)
    if method != "linear" and rank is None and energy is None:
        raise MergeStudioError(
            f"--method {method} merges dense updates, which are not low-rank any more; give --rank or --energy "
            "for the truncated SVD that turns the result back into a LoRA."
        )
    if method == "linear" and density is not None:
        raise MergeStudioError("--density has no meaning for --method linear (nothing is trimmed or dropped).")
    if not loras:
        raise MergeStudioError("Give at least one LoRA to combine.")
    files: list[LoraFile] = []
    try:
        files = [open_lora(p) for p in loras]
        w = _numbers(weights, len(files), "weights", 1.0)
        kernel, params, model_params = _method(method, files, w, density)
        fmt, modules = _modules(files)
        _check_ranks(modules, rank)
        output = Path(output)
        if fmt == PEFT and output.suffix == ".safetensors":
            raise MergeStudioError(f"{output}: PEFT adapters are folders; give a folder name.")
        atomic = atomic_output(output, single=fmt == KOHYA, overwrite=overwrite)
        atomic.check()
        out_dtype = output_dtype(dtype, _common_dtype(files))
        result = yield from _write(files, modules, fmt, atomic, method, w, kernel, params, model_params,
                                   rank, energy, seed, svd, out_dtype)
        return result
    finally:
        for f in files:
            f.close()


def combine_loras(
    loras: Sequence[Union[str, Path]], output: Union[str, Path], *, on_progress=None, cancel=None, **options: Any
) -> CombineResult:
    """Combine LoRAs; see :func:`iter_combine` for the options."""
    from core.jobs import drive

    return drive(iter_combine(loras, output, **options), on_progress, cancel)


def _method(method: str, files: list[LoraFile], weights: list[float], density):
    """The registry kernel with its defaults, and per-LoRA parameters (validated by its schema)."""
    if method == "linear":
        return None, {}, []
    from core.merge import methods as registry
    from core.merge.methods.base import GLOBAL, REQUIRED

    spec = registry.get(method)
    params = {p.name: p.default for p in spec.parameters if p.scope == GLOBAL and p.default is not REQUIRED}
    densities = _numbers(density, len(files), "density", 1.0)
    model_params: list[dict] = [{}]  # the zero base
    for f, w, d in zip(files, weights, densities):
        mp = {p.name: p.default for p in spec.parameters if p.scope != GLOBAL and p.default is not REQUIRED}
        try:
            mp["density"] = spec.parameter("density").validate(d, f"--density of {f.name}")  # type: ignore[union-attr]
        except RecipeError as exc:
            raise MergeStudioError(str(exc)) from None
        mp["weight"] = w
        model_params.append(mp)
    return spec.kernel, params, model_params


def _modules(files: list[LoraFile]) -> tuple[str, dict[str, list[Optional[LoraModule]]]]:
    """Module name -> its module in each LoRA (None where absent); shapes checked to agree."""
    fmt = files[0].format
    for f in files[1:]:
        if f.format != fmt:
            raise ModelError(
                f"LoRA {f.path} is in {f.format} format, {files[0].path} in {fmt}; combine LoRAs of one format."
            )
    modules: dict[str, list[Optional[LoraModule]]] = {}
    for i, f in enumerate(files):
        for name, module in f.modules.items():
            modules.setdefault(name, [None] * len(files))[i] = module
    for name, per_file in modules.items():
        present = [(files[i], m) for i, m in enumerate(per_file) if m is not None]
        first_file, first = present[0]
        for f, m in present[1:]:
            if (m.delta_shape, m.in_shape, m.transpose) != (first.delta_shape, first.in_shape, first.transpose):
                raise ModelError(
                    f"LoRA {f.path}: module '{name}' makes an update of shape {list(m.delta_shape)} "
                    f"(down {list(m.in_shape)}) but {first_file.path} one of shape {list(first.delta_shape)} "
                    f"(down {list(first.in_shape)}); "
                    "they cannot be combined."
                )
    return fmt, modules


def _matrix_shape(module: LoraModule) -> tuple[int, int]:
    """(m, n) of the matrix B @ A (conv kernels flattened into n)."""
    return module.out_features, math.prod(module.in_shape)


def _check_ranks(modules: dict[str, list[Optional[LoraModule]]], rank: Optional[int]) -> None:
    if rank is None:
        return
    for name, per_file in modules.items():
        module = next(m for m in per_file if m is not None)
        m, n = _matrix_shape(module)
        if rank > min(m, n):
            raise MergeStudioError(
                f"--rank {rank} is larger than module '{name}' allows: its update is {m}×{n}, "
                f"so at most rank {min(m, n)}."
            )


def _common_dtype(files: list[LoraFile]) -> "torch.dtype":
    import torch

    from core.io.tensors import torch_dtype

    dtypes = {f.tensors[m.up].dtype for f in files for m in f.modules.values()}
    return torch_dtype(dtypes.pop()) if len(dtypes) == 1 else torch.float32


def _write(
    files, modules, fmt, atomic, method, weights, kernel, params, model_params, rank, energy, seed, svd, out_dtype
) -> Generator[Progress, None, CombineResult]:
    import torch

    from core.merge.methods.base import TensorInputs

    started = time.monotonic()
    exact = method == "linear" and rank is None and energy is None
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    names = list(modules)
    with atomic as tmp:
        folder = tmp.parent if fmt == KOHYA else tmp
        writer = LoraWriter(fmt, folder, out_dtype)
        try:
            for done, name in enumerate(names, 1):
                per_file = modules[name]
                template = next(m for m in per_file if m is not None)
                keys = ["zero-base"] + [str(f.path) for f in files]
                if method == "linear":
                    a, b, error = _linear(files, per_file, weights, rank, energy)
                else:
                    inputs = TensorInputs(name, _dense(files, per_file, template), 0, params, model_params, keys, seed)
                    merged = kernel(inputs)
                    del inputs
                    gen = seeded_generator(name, "|".join(keys), seed)
                    found = factorize(merged, rank=rank, energy=energy, svd=svd, generator=gen)
                    a, b, error = found.a, found.b, found.relative_error
                    del merged
                if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ModelError(
                        f"Module '{name}': the combined LoRA has NaN or Inf values (check the inputs and weights)."
                    )
                a = a.reshape(a.shape[0], *template.in_shape)
                if len(template.in_shape) == 3:  # conv: B is [out, r, 1, 1]
                    b = b.reshape(b.shape[0], b.shape[1], 1, 1)
                writer.add(name, a, b, embedding=template.embedding)
                ranks[name] = int(a.shape[0])
                if error is not None:
                    errors[name] = error
                yield Progress(done, len(names), 0, 0, time.monotonic() - started, name)
            record = {
                "method": method,
                "loras": [str(f.path) for f in files],
                "weights": weights,
                "density": [mp.get("density") for mp in model_params[1:]] or None,
                "rank": rank,
                "energy": energy,
                "seed": seed,
                "exact": exact,
            }
            metadata = {"format": "pt", METADATA_KEY: json.dumps(record)}
            if fmt == KOHYA:
                metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks.values())),
                                 "ss_network_alpha": str(max(ranks.values()))})
                writer.finish(tmp, metadata)
            else:
                writer.finish(tmp / "adapter_model.safetensors", metadata)
                config = peft_config(files[0].config, ranks)
                (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        finally:
            writer.close()
    return CombineResult(atomic.target, method, fmt, len(names), ranks, exact, errors, time.monotonic() - started)


def _linear(files, per_file, weights, rank, energy):
    """Concatenated factors (exact), or their product re-factored (rank/energy)."""
    import torch

    a_parts, b_parts = [], []
    for f, m, w in zip(files, per_file, weights):
        if m is None:
            continue
        a, b = f.factors(m, torch.float32)
        c = w * f.scale(m)
        root = math.sqrt(abs(c))
        a_parts.append(a.reshape(a.shape[0], -1) * root)
        b_parts.append(b.reshape(b.shape[0], -1) * (root if c >= 0 else -root))
    a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
    if rank is None and energy is None:
        return a_cat, b_cat, None
    found = factorize_product(b_cat, a_cat, rank=rank, energy=energy)
    return found.a, found.b, found.relative_error


def _dense(files, per_file, template: LoraModule) -> list["torch.Tensor"]:
    """[zero base, s_1 B_1 A_1, ...] as 2-D float32 matrices (B @ A, before any transpose)."""
    import torch

    m, n = _matrix_shape(template)
    tensors = [torch.zeros(m, n)]
    for f, module in zip(files, per_file):
        if module is None:
            tensors.append(torch.zeros(m, n))
            continue
        a, b = f.factors(module, torch.float32)
        tensors.append(product(a, b).reshape(m, n) * f.scale(module))
    return tensors
