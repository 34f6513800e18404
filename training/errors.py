"""Errors the training package reports. Each message is one line a user can act on."""


class TrainingError(Exception):
    """Base class: anything ``python -m training`` reports to its user without a traceback."""


class ConfigError(TrainingError):
    """A config value or a YAML file is wrong."""


class DataError(TrainingError):
    """The dataset can't be read or holds nothing usable."""
