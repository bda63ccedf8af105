"""Errors caused by the user's input. Entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input: a config, a path, a file. The message alone must tell the user what to fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration file or ``--set`` override."""


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line, whitespace folded (its type name if it has none): for messages
    whose later lines say why (a reader's parse error)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
