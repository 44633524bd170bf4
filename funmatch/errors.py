"""User-facing errors: each names the bad value and what was expected."""


class FunmatchError(Exception):
    """Base class for errors the CLI reports as one line, without a traceback."""


class ConfigError(FunmatchError):
    """A preset, key or value that cannot be used."""


class DataError(FunmatchError):
    """A data source that cannot be read or holds no usable images."""


class CheckpointError(FunmatchError):
    """A checkpoint that does not fit the model or the config."""
