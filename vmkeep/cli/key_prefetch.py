"""Start deriving the repository key before the command's modules load.

A command that opens a passphrase-protected repository spends tens of milliseconds in scrypt,
and about as long importing its modules on one core. Both are fixed costs of every scheduled
job, and an incremental backup of an unchanged disk is little else. So the executable looks at
its arguments first, with nothing but the standard library: for each argument naming a local
repository directory it reads the key parameters from ``config.json`` and starts scrypt on a
spare core (:mod:`vmkeep.repository.kdf`). Opening the repository later joins that derivation.

Nothing here reports errors: an unreadable file or an odd argument just means no head start,
and the command's own code then says what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from vmkeep.errors import UsageError
from vmkeep.repository import kdf

PASSPHRASE_FILE = "--passphrase-file"
REPO_OPTIONS = ("--repo", "-r")


def _arguments(argv: list[str]) -> tuple[list[str], Path | None]:
    """Arguments that may name a repository directory, and the passphrase file if one is given."""
    candidates: list[str] = []
    passphrase_file: Path | None = None
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name == PASSPHRASE_FILE:
            found = value if eq else next(args, None)
            passphrase_file = Path(found) if found else None
        elif name in REPO_OPTIONS and eq:
            candidates.append(value)
        elif not arg.startswith("-") or arg == "--":
            candidates.append(arg)
    return candidates, passphrase_file


def _key_parameters(location: str) -> dict[str, object] | None:
    """The scrypt parameters of the passphrase-protected local repository at ``location``."""
    if "://" in location:
        return None  # object storage: reading its config costs a round trip and the S3 client
    try:
        config = json.loads((Path(location) / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("vmkeep") != "repository":
        return None
    encryption = config.get("encryption")
    if not isinstance(encryption, dict) or encryption.get("mode") != "passphrase" or encryption.get("kdf") != "scrypt":
        return None
    return encryption


def prefetch(argv: list[str]) -> None:
    """Start the key derivation of every local passphrase-protected repository ``argv`` names."""
    candidates, passphrase_file = _arguments(argv)
    params = [p for p in map(_key_parameters, candidates) if p is not None]
    if not params:
        return
    try:
        passphrase = kdf.read_passphrase(passphrase_file)
    except UsageError:  # the command reports an unreadable passphrase file itself
        return
    if not passphrase:
        return
    for p in params:
        try:
            kdf.start(passphrase, *kdf.parameters(p))
        except (KeyError, ValueError):
            continue
