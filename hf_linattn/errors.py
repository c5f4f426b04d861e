"""Errors a user can act on. The CLI prints their message alone, on one line, and exits with status 1.

Every refusal of hf_linattn derives from ``UserError``; the CLI catches this class, never message
text. Anything else is a bug or an environment problem: the CLI prints one line naming it and
points to ``--debug`` for the traceback. Plain Python, so the CLI can import it without torch.
Subclasses that used to be plain ``ValueError`` / ``FileNotFoundError`` still derive from those.
"""

from __future__ import annotations


class UserError(Exception):
    """A refusal with a message that says what is wrong and how to fix it (one line)."""


class InputError(UserError):
    """An input (checkpoint, tokenizer, data, flag value) cannot be used."""


class OutputFolderError(UserError):
    """Writing to the requested output would destroy something that is not ours to replace."""


class StateFileError(UserError):
    """A saved state file (recipe, training state, manifest) is unreadable; the message names it and the fix."""


class HubError(UserError):
    """A Hub operation failed; the local files were left as they were."""


def one_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of ``text`` (an exception's message), cut to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = ["HubError", "InputError", "OutputFolderError", "StateFileError", "UserError", "one_line"]
