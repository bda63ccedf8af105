"""Errors caused by the user's input. Entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input: a config, a path, a file. The message alone must tell the user what to fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration file or ``--set`` override."""
