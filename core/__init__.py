"""Merge Studio engine: model access, weight merging, token merging, inspection.

Importing ``core`` is cheap: torch, transformers and diffusers load only when a
function that needs them runs.
"""

__version__ = "0.1.0"
