"""Our own exception types.

Every error a user can cause (a bad config, a malformed record, a missing file, a model that does not
fit) is raised as a `LoraforgeError` whose message says what, where, and what to do. The CLI prints
these without a traceback and exits non-zero; anything else is a bug in loraforge and keeps its traceback.
"""


class LoraforgeError(Exception):
    """Base class for errors caused by the user's input or environment, with a message meant for people."""

    exit_code = 2


class ConfigError(LoraforgeError):
    """A config key, type or value is not allowed."""


class DataError(LoraforgeError):
    """A data source or record cannot be used (names the file, record and field)."""


class ModelLoadError(LoraforgeError):
    """A model, tokenizer or adapter cannot be found or loaded."""


class ResourceError(LoraforgeError):
    """The job does not fit the device (memory) or the disk."""


class TrainingError(LoraforgeError):
    """Training had to stop (e.g. repeated non-finite losses); a checkpoint was written first."""


class RunFolderError(LoraforgeError):
    """A run folder cannot be used as asked: it holds another run, another process is training into it,
    or none of its checkpoints is intact."""
