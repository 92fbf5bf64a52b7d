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


class BuildInterrupted(KeyboardInterrupt):
    """A build, convert or merge stopped by SIGINT or SIGTERM (``signum``), every worker ended.

    A ``KeyboardInterrupt`` still (code that catches one keeps working); the message says how far
    the job got and what was kept. The CLI adds the command that resumes it and exits ``128 +
    signum``."""

    def __init__(self, message: str, signum: int, resumable: bool):
        super().__init__(message)
        self.signum = signum
        self.resumable = resumable


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the CLI's SIGTERM handler, so that a ``kill`` stops a job the
    way a Ctrl-C does (workers ended, one line, exit 143)."""

    signum = 15
