"""User-facing errors: each names the bad value and what was expected; and the preemption exit code."""

PREEMPTED_EXIT = 143  # 128 + SIGTERM: a preempted process checkpointed (or cancelled) and exits for its retry


class FunmatchError(Exception):
    """Base class for errors the CLI reports as one line, without a traceback."""


class ConfigError(FunmatchError):
    """A preset, key or value that cannot be used."""


class DataError(FunmatchError):
    """A data source that cannot be read or holds no usable images."""


class CheckpointError(FunmatchError):
    """A checkpoint that does not fit the model or the config."""


class QualityGateStop(FunmatchError):
    """The quality gate stopped the run before export: the student fell short."""

    PREFIX = "quality gate: not exported or published"

    def __init__(self, reason: str) -> None:
        super().__init__(f"{self.PREFIX}: {reason}")


class TrainingError(FunmatchError):
    """A training run that cannot go on: its loss or gradient norm became NaN or infinite."""
