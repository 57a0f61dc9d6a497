"""User-facing errors: the CLI prints their message (what was wrong, what to do) without a traceback."""


class TuneryError(Exception):
    """Base of every error whose message is meant for the user."""


class DataError(TuneryError):
    """The training data cannot be read or would train on nothing."""


class ModelError(TuneryError):
    """The model or tokenizer cannot be loaded or used."""


class RunError(TuneryError):
    """A run folder is missing, incomplete or cannot be resumed."""


class ExportError(TuneryError):
    """An export cannot be written, or its verification against the torch model failed."""
