"""Errors a user sees. The CLI prints these as one clear line (no traceback) and exits non-zero."""


class DetkdError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ConfigError(DetkdError, ValueError):
    """A bad configuration key or value."""


class DataError(DetkdError):
    """A dataset problem (missing file, bad annotation, ...)."""


class EvalError(DetkdError):
    """An evaluation that cannot be scored correctly as asked (classes that do not match, a missing engine, ...)."""


class ClassMismatchError(EvalError, ValueError):
    """The model's class names do not match the dataset's categories (scoring by position would mis-score)."""
