"""The project's own exceptions. The CLI prints any of them as one line (no traceback unless
``--debug``); each message names the file at fault and what is wrong with it."""


class InstbankError(Exception):
    """Base class: a problem the user can act on, reported in one line."""


class InputError(InstbankError):
    """A data set file (annotation json, label file, image, yaml) is unreadable or malformed."""


class BankError(InstbankError):
    """A bank on disk is missing, incomplete, corrupt, locked, or from an unsupported format."""


class BuildError(InstbankError):
    """A build cannot proceed (output exists, not writable, disk full, strict mode skip)."""
