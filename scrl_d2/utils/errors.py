"""Bad input, as the project itself diagnoses it.

Only these exceptions end a command with one line and exit status 2: the project raised
them after checking a key, value, path or file and its message says what is expected.
Any other exception, even a ``ValueError`` or ``KeyError`` from deep inside a library, is
a failure whose traceback must be seen (exit status 1), so that a bug is never reported
as the user's mistake. Each class is also the built-in exception it refines, so callers
that catch ``ValueError`` / ``FileNotFoundError`` / ``KeyError`` / ``ImportError`` still
catch it.
"""
from typing import Optional

__all__ = ["ConfigError", "BadInput", "InputValueError", "InputKeyError", "InputFileNotFoundError", "InputImportError",
           "bad_input_cause", "is_bad_input"]


class BadInput(Exception):
    """Marker of a diagnosed bad input: the message names the key, value or path and what
    is expected."""


class InputValueError(BadInput, ValueError):
    """A config value, argument or file content that cannot work."""


class InputKeyError(BadInput, KeyError):
    """An unknown name (dataset, protocol, registry entry). Prints its message as is,
    not quoted as ``KeyError`` does."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputFileNotFoundError(BadInput, FileNotFoundError):
    """A path given by the user (config, argument, dataset root) that does not exist."""


class InputImportError(BadInput, ImportError):
    """An optional package the requested feature needs; the message says how to install it."""


def bad_input_cause(e: BaseException) -> Optional[BadInput]:
    """The diagnosed bad input behind ``e``: ``e`` itself, or one it was explicitly raised
    from (``raise ValueError(f"MODEL.WEIGHTS {path}: {e}") from e`` adds the key to a
    diagnosis and keeps it one); None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, BadInput):
            return e
        seen.add(id(e))
        e = e.__cause__
    return None


def is_bad_input(e: BaseException) -> bool:
    return bad_input_cause(e) is not None


class ConfigError(InputValueError):
    """A configuration file, key or value that cannot be used; the message names it (bad
    input: one line and exit status 2)."""
