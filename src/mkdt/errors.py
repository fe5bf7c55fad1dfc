"""Exceptions for user mistakes. The CLI prints them as one line, never as a stack trace."""


class MkdtError(Exception):
    """Base class: a problem the user can fix (bad config, missing data, incompatible artifact)."""


class ConfigError(MkdtError):
    """A config key is unknown or a value is out of range."""


class DataError(MkdtError):
    """A dataset is missing, incomplete or corrupt."""


class ArtifactError(MkdtError):
    """An artifact in the run directory is missing, corrupt or made with an incompatible config."""


class TrainingDiverged(MkdtError):
    """A training loop met a non-finite loss; the message names the stage and the option to lower."""
