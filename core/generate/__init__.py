"""Side-by-side generation: the same prompt and seed through several models.

* :mod:`core.generate.text` -- causal LMs (local folders, or a recipe merged in
  memory by :mod:`core.generate.in_memory`), token by token, with timings.
* :mod:`core.generate.image` -- diffusers pipelines step by step, optionally with
  token merging on one pane, plus :func:`~core.generate.image.difference_image`.

Each pane runs after the previous one has finished and freed its model, so memory
holds one model at a time. The work is a generator of events (``PaneStarted``,
``PaneToken`` / ``PaneStep``, ``PaneFinished``) that a GUI worker forwards; a plain
function drives it. Importing this package is cheap: nothing here imports torch,
transformers or diffusers at module level.
"""


def unique_label(name: str, taken: set[str]) -> str:
    """``name``, or ``name (2)``, ``name (3)``... the first not in ``taken`` (which it joins): pane labels."""
    label, n = name, 1
    while label in taken:
        n += 1
        label = f"{name} ({n})"
    taken.add(label)
    return label
