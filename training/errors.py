"""Errors the training package reports. Each message is one line a user can act on."""


class TrainingError(Exception):
    """Base class: anything ``python -m training`` reports to its user without a traceback."""


class ConfigError(TrainingError):
    """A config value or a YAML file is wrong."""


class DataError(TrainingError):
    """The dataset can't be read or holds nothing usable."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when empty): third-party errors
    (hub, network) often span many lines, and this package's messages are one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
