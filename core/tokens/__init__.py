"""Token merging: make a transformer cheaper to run by merging similar tokens inside it.

``core.tokens.bipartite`` is the foundation every method builds on: bipartite soft
matching (ToMe, Bolya et al. 2023, https://arxiv.org/abs/2210.09461) with a
similarity-threshold mode (DyMU, https://arxiv.org/abs/2504.17040), merge and
unmerge, size tracking with proportional attention, source tracking and r schedules.

``core.tokens.apply(model, method="tome", r=..., ...)`` patches a transformers encoder
(BERT, ViT, DeiT, CLIP vision; :mod:`core.tokens.api`) and returns a handle with
``.remove()``, ``.stats``, ``.unmerge()`` and ``.sources``; ``core.tokens.methods()``
lists the methods and their parameters for the GUI.

Importing this package is cheap: nothing here imports torch at module level.
"""


def apply(model, method: str = "tome", **options):
    """Patch a model to merge tokens; returns a handle with ``.remove()``, ``.stats``, ``.unmerge()``.

    See :func:`core.tokens.api.apply` (a thin wrapper, so importing ``core.tokens``
    stays cheap).
    """
    from core.tokens import api

    return api.apply(model, method, **options)


def methods() -> list[dict]:
    """The token-merging methods with their parameters; see :func:`core.tokens.api.methods`."""
    from core.tokens import api

    return api.methods()


__all__ = ["apply", "methods"]
