"""Error types the toolkit raises for bad input.

Every user-facing failure is one of these, with a message that names the problem and the
fix, so the CLI can print it as one line instead of a traceback.
"""


class EloraFedError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(EloraFedError):
    """An unknown key or a bad value in the run configuration."""


class ModelLoadError(EloraFedError):
    """A base model that is missing, corrupt, or unreachable offline."""


class DataError(EloraFedError):
    """Data that is missing, empty, or cannot make the samples asked for."""


class ZeroGradientError(EloraFedError):
    """A backward pass at a finite loss gave exactly zero for every trainable gradient.

    Training on it would silently learn nothing; the usual cause is a base-model kernel
    without an autograd formula (``elora_fed.model.models.keep_4bit_layers_differentiable``).
    """
