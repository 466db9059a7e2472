"""Every exception diskivf raises on purpose lives here.

Each class also inherits the builtin a caller would naturally catch (``ValueError``,
``FileNotFoundError``...), so ``except ValueError`` keeps working for code that does not know
about diskivf, while ``except diskivf.errors.DiskIVFError`` catches every error about an index
and its files. Invalid arguments (a wrong shape, dtype or value passed in) raise the plain
builtins ``ValueError`` and ``TypeError``, as numpy does, and are not ``DiskIVFError``.
"""

from __future__ import annotations

__all__ = [
    "AlreadyTrainedError",
    "CorruptIndexError",
    "DiskIVFError",
    "FormatError",
    "IndexExistsError",
    "IndexNotFoundError",
    "IndexReplacedError",
    "LockedError",
    "MissingDependencyError",
    "NotTrainedError",
    "PoisonedError",
    "ReadOnlyError",
    "UnsupportedVersionError",
]


class DiskIVFError(Exception):
    """Base class for all diskivf errors."""


class FormatError(DiskIVFError, ValueError):
    """The files are not a valid diskivf index (not an index at all, or malformed)."""


class CorruptIndexError(FormatError):
    """The files were a diskivf index but their contents are damaged (checksum, size...)."""


class UnsupportedVersionError(FormatError):
    """The index was written with a format version this library cannot read."""


class IndexNotFoundError(DiskIVFError, FileNotFoundError):
    """No index exists at the given path (and the open mode does not create one)."""


class IndexExistsError(DiskIVFError, FileExistsError):
    """An index (or other content) already exists where mode ``"w-"`` must create one."""


class IndexReplacedError(DiskIVFError, RuntimeError):
    """The index was re-created (mode ``"w"``) after this handle opened it; open it again."""


class ReadOnlyError(DiskIVFError, PermissionError):
    """A write was attempted on an index opened read-only."""


class LockedError(DiskIVFError, BlockingIOError):
    """Another writer holds the index's lock file."""


class NotTrainedError(DiskIVFError, RuntimeError):
    """The operation needs a trained index (centroids) and ``train()`` has not run."""


class AlreadyTrainedError(DiskIVFError, RuntimeError):
    """``train()`` was called on an index that already has centroids."""


class PoisonedError(DiskIVFError, OSError):
    """An earlier write failed (disk full, fsync error); reopen the index to continue.

    After a failed ``fsync`` the kernel may have dropped dirty pages, so the writer cannot know
    what reached the disk. It refuses further writes; the files still hold the last commit.
    """


class MissingDependencyError(DiskIVFError, ImportError):
    """An optional dependency needed for this feature is not installed."""
