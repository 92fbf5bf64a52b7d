"""instbank: build an instance bank for copy-paste augmentation and paste from it on the GPU.

Importing the package is cheap: torch, Triton, lmdb and webdataset are imported only when used.
"""

from instbank.errors import BankError, BuildError, InputError, InstbankError
from instbank.version import __version__

__all__ = ["open_bank", "InstbankError", "InputError", "BankError", "BuildError", "__version__"]


def open_bank(path, cache=None):
    """Open the bank at ``path`` (any backend; a directory or a URL, pulled into the local
    directory ``cache`` first when given); see :func:`instbank.storage.open_bank`."""
    from instbank.storage import open_bank as _open_bank

    return _open_bank(path, cache=cache)
