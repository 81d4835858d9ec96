"""The one exception type that reaches users.

A :class:`MergeStudioError` carries a single sentence that names the file, tensor
or field at fault. The CLI prints it on one line; the GUI shows it in a dialog.
Anything else that escapes is a bug and is reported as such.
"""


class MergeStudioError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


class RecipeError(MergeStudioError):
    """The recipe is malformed or inconsistent (field names, methods, parameters)."""


class ModelError(MergeStudioError):
    """A model on disk cannot be used (missing, corrupt, wrong format, mismatched)."""


class CancelledError(MergeStudioError):
    """The user cancelled a running job."""

    def __init__(self, message: str = "Cancelled by the user; nothing was written.") -> None:
        super().__init__(message)
