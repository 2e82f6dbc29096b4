"""Error types whose messages tell an administrator what happened and what to do next.

Every error the CLI reports is a :class:`VmkeepError`; anything else is a bug and is shown
with a traceback.
"""


class VmkeepError(Exception):
    """Base of every error vmkeep reports to the user."""

    exit_code = 1


class UsageError(VmkeepError):
    """The command was given input it cannot use (bad name, bad option value)."""

    exit_code = 2


class RepositoryError(VmkeepError):
    """The repository cannot be opened or used."""


class WrongPassphrase(RepositoryError):
    """The passphrase or key file does not unlock the repository."""


class FormatTooNew(RepositoryError):
    """The repository (or one of its objects) was written by a newer vmkeep."""


class ObjectMissing(RepositoryError):
    """An object a restore point needs is not in the repository."""


class ObjectCorrupt(RepositoryError):
    """An object's bytes do not match their checksum, id or authentication tag."""


class BackendError(RepositoryError):
    """The storage backend failed (disk full, permission, S3 unreachable or failing)."""


class PointNotFound(VmkeepError):
    """No restore point matches what was asked for."""


class ImageError(VmkeepError):
    """A disk image cannot be opened or read."""


class Cancelled(VmkeepError):
    """The operation was interrupted (Ctrl-C, or a job cancelled); nothing partial was committed."""

    exit_code = 130


class LabError(VmkeepError):
    """The lab (libvirt daemons, lab guest image, lab VMs) cannot be set up or used."""
