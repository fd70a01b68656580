"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class FaceforgeError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(FaceforgeError):
    """A configuration key, value or type is wrong; the message names the key."""


class DataError(FaceforgeError):
    """A data file or record is missing or corrupt; the message names the file and record."""
