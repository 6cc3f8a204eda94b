"""User-facing errors.

Every error a user can cause (bad config, missing file, incompatible adapter) is raised as
`UserError`: the CLI prints its message (no traceback) and exits with `exit_code` (2).
Messages name the problem and the fix: the config key with its dotted path and a
"did you mean", the file that failed to load and why.
"""


class UserError(Exception):
    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, of the wrong type or out of range, or a path is missing."""


class ModelLoadError(UserError):
    """A base model, VAE or adapter file could not be loaded."""


class DataError(UserError):
    """The dataset is empty or unusable."""
