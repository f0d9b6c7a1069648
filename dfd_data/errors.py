"""Errors about what the user gave or has installed. Each message is one line; the command
line shows it as it is, without a traceback."""


class UserError(Exception):
    """Base of every error the command line reports as a one-line message."""


class ModelMissingError(UserError, RuntimeError):
    """Weights or a model file that must come from a package or a fetch step are not there;
    the message names the command or package that provides them."""


class DeviceError(UserError, RuntimeError):
    """A device that was asked for but is not there."""
