"""Errors about what the user gave or has installed. Each message is one line; the command
line shows it as it is, without a traceback."""


class UserError(Exception):
    """Base of every error the command line reports as a one-line message."""


class SetupError(UserError, RuntimeError):
    """What a machine lacks (usable weights, a device), not what is wrong with an input: in a
    batch, every file would fail alike on that machine, so the failures name the machine."""


class ModelMissingError(SetupError):
    """Weights or a model file that must come from a package or a fetch step are not there;
    the message names the command or package that provides them."""


class DeviceError(SetupError):
    """A device that was asked for but is not there."""
