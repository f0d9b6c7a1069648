"""Errors shared by the data-preparation modules; each message is one line for the user."""


class ModelMissingError(RuntimeError):
    """Weights or a model file that must come from a package or a fetch step are not there;
    the message names the command or package that provides them."""
