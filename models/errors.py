"""Errors the model layer raises; each message is one readable line for the user."""


class ModelError(Exception):
    """Base class: anything wrong with a checkpoint or its use."""


class CheckpointNotFound(ModelError):
    """The path or model id does not lead to a checkpoint."""


class UnsupportedModel(ModelError):
    """config.json describes a model this project does not implement."""


class CheckpointError(ModelError):
    """The checkpoint's files are incomplete, corrupt, or do not match config.json."""


class PickleRefused(ModelError):
    """Only pickle weights (pytorch_model.bin) exist and the user did not allow loading them."""
