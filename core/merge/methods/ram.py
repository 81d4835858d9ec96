"""RAM and RAM+ (tensor-local): merge task vectors by averaging only where they change something.

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (the reference
mergekit 0.1.5 gives for ``ram`` and ``ramplus_tl``).

With base ``w0`` and task vectors ``d_i = w_i - w0``, an element counts as
changed by model ``i`` when ``|d_i| > epsilon``; ``c`` is the number of models
that change it. Unchanged elements are dropped (zeroed) from each ``d_i``.

- ``ram``: elements only one model changes keep that model's change; elements
  several models change get the mean of their changes:
  ``merged = w0 + sum_i d_i [changed_i] / max(c, 1)``.
- ``ramplus_tl``: as ``ram``, but each model's unique changes are scaled by
  ``1 + r * clamp(shared_i / unique_i, 0, alpha)``, where ``shared_i`` and
  ``unique_i`` count this tensor's elements model ``i`` changes together with
  others and alone (``unique_i`` floored at ``epsilon``). The counts are taken
  per tensor ("tensor-local").

The arithmetic runs in the input dtype, as in mergekit; the result has the
input dtype (mergekit's ``ramplus_tl`` returns float32 for half-precision
inputs, which its writer then casts back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_REQUIRED, GLOBAL, MergeMethod, Parameter, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor


def _changes(base: Tensor, tensors: list[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """Task vectors ``(N, n)`` with unchanged entries zeroed, the changed mask ``(N, n)``
    and the number of models that change each element ``(1, n)``."""
    import torch

    deltas = torch.stack([w - base for w in tensors]).reshape(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, counts


def ram(base: Tensor, tensors: list[Tensor], epsilon: float = 1e-5) -> Tensor:
    """RAM merge of ``tensors`` (each ``(...)``) onto ``base`` (``(...)``) -> ``(...)``."""
    if not tensors:
        return base
    deltas, _, counts = _changes(base, tensors, epsilon)
    # A unique change is divided by 1 and so kept as it is; elements nobody
    # changes are zero in every row.
    merged = (deltas / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ramplus_tl(
    base: Tensor, tensors: list[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> Tensor:
    """RAM+ (tensor-local) merge of ``tensors`` (each ``(...)``) onto ``base`` -> ``(...)``."""
    if not tensors:
        return base
    deltas, changed, counts = _changes(base, tensors, epsilon)
    unique = counts == 1
    overlap = counts > 1
    shared_counts = (changed & overlap).sum(dim=1)
    unique_counts = (changed & unique).sum(dim=1)
    # A model whose changes are mostly shared (diluted by the averaging) gets
    # its unique changes boosted, by at most r * alpha.
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (deltas * unique * boost.unsqueeze(-1) + deltas * overlap / counts.clamp(min=1)).sum(dim=0)
    return (base + merged.reshape(base.shape)).to(base.dtype)


def _ram(inputs: TensorInputs) -> Tensor:
    """Kernel: base plus zero or more tensors of shape ``(...)`` -> ``(...)``."""
    others = [inputs.tensors[i] for i in inputs.non_base_indices()]
    return ram(inputs.base, others, epsilon=float(inputs.params["epsilon"]))


def _ramplus_tl(inputs: TensorInputs) -> Tensor:
    """Kernel: base plus zero or more tensors of shape ``(...)`` -> ``(...)``."""
    others = [inputs.tensors[i] for i in inputs.non_base_indices()]
    return ramplus_tl(
        inputs.base,
        others,
        r=float(inputs.params["r"]),
        alpha=float(inputs.params["alpha"]),
        epsilon=float(inputs.params["epsilon"]),
    )


def _epsilon() -> Parameter:
    return Parameter(
        "epsilon",
        float,
        1e-5,
        "A task-vector entry counts as a change only when its magnitude exceeds this.",
        scope=GLOBAL,
        slider=(0.0, 1e-3),
    )


register(
    MergeMethod(
        name="ram",
        display_name="Reinforced Agent Merging",
        paper="https://arxiv.org/abs/2601.13572",
        description="Keeps changes made by one model, averages changes made by several.",
        kernel=_ram,
        parameters=(_epsilon(),),
        base=BASE_REQUIRED,
        min_models=1,
    )
)

register(
    MergeMethod(
        name="ramplus_tl",
        display_name="Reinforced Agent Merging Plus (Tensor-Local)",
        paper="https://arxiv.org/abs/2601.13572",
        description="RAM with each model's unique changes boosted by how much of its change is shared.",
        kernel=_ramplus_tl,
        parameters=(
            Parameter("r", float, 0.1, "Strength of the boost of unique changes.", scope=GLOBAL, slider=(0.0, 1.0)),
            Parameter(
                "alpha",
                float,
                0.2,
                "Cap on the shared/unique ratio used in the boost.",
                scope=GLOBAL,
                slider=(0.0, 1.0),
            ),
            _epsilon(),
        ),
        base=BASE_REQUIRED,
        min_models=1,
    )
)
