"""Passphrase key derivation (scrypt), which a command may start early on a spare core.

scrypt is deliberately slow (tens of milliseconds, 32 MiB) and releases the GIL, while a command's
start-up is mostly single-threaded imports. :func:`start` runs a derivation in the background;
:func:`derive` with the same inputs then takes its result instead of deriving again. A process
that opens the same repository again (a proxy's worker, once per job) reuses the key it derived:
it holds the passphrase for its whole life anyway. This module imports nothing heavy so that the
derivation can start before the rest of the program loads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from vmkeep.errors import UsageError

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 256 * 1024 * 1024
# What a repository config may ask for: vmkeep writes N=2^15, r=8, p=1 (32 MiB, tens of ms); the
# bounds allow 16 times that work and no more memory than SCRYPT_MAXMEM.
SCRYPT_MAX_N = 2**20
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
SCRYPT_MAX_WORK = 16 * SCRYPT_N * SCRYPT_R * SCRYPT_P

_Inputs = tuple[bytes, bytes, int, int, int]


class _Derivation(threading.Thread):
    def __init__(self, inputs: _Inputs) -> None:
        super().__init__(name="vmkeep-kdf", daemon=True)
        self.inputs = inputs
        self.key: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.key = _scrypt(*self.inputs)
        except BaseException as exc:  # handed to the caller of derive()
            self.error = exc


_started: dict[_Inputs, _Derivation] = {}
_derived: OrderedDict[_Inputs, bytes] = OrderedDict()  # finished, newest last
DERIVED_KEPT = 16  # repositories (or passphrases) a long-running process keeps keys for
_lock = threading.Lock()


def check_cost(n: int, r: int, p: int) -> None:
    """Refuse scrypt parameters beyond the bounds (ValueError) before anything is derived."""
    if not (2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= SCRYPT_MAX_R and 1 <= p <= SCRYPT_MAX_P
            and n * r * p <= SCRYPT_MAX_WORK and 128 * r * (n + p + 2) <= SCRYPT_MAXMEM):
        raise ValueError(
            f"scrypt n={n}, r={r}, p={p} is beyond what vmkeep allows (n a power of two up to 2^20, r up to "
            f"{SCRYPT_MAX_R}, p up to {SCRYPT_MAX_P}, at most {SCRYPT_MAX_WORK // (SCRYPT_N * SCRYPT_R)} times "
            f"the default work, {SCRYPT_MAXMEM >> 20} MiB)"
        )


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    check_cost(n, r, p)
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def start(passphrase: bytes, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> None:
    """Begin deriving in a background thread; a later :func:`derive` of the same inputs joins it."""
    inputs = (passphrase, salt, n, r, p)
    with _lock:
        if inputs in _started:
            return
        job = _started[inputs] = _Derivation(inputs)
    job.start()


def derive(passphrase: bytes, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    """The 32-byte scrypt key: derived before by this process, or the result of a matching
    :func:`start` if one ran, else derived now."""
    inputs = (passphrase, salt, n, r, p)
    with _lock:
        if inputs in _derived:
            _derived.move_to_end(inputs)
            return _derived[inputs]
        job = _started.pop(inputs, None)
    if job is None:
        key = _scrypt(*inputs)
    else:
        job.join()
        # a failed head start derives again, so that its error (bad parameters, memory) surfaces here
        key = job.key if job.error is None and job.key is not None else _scrypt(*inputs)
    with _lock:
        _derived[inputs] = key
        while len(_derived) > DERIVED_KEPT:
            _derived.popitem(last=False)
    return key


def parameters(wrapped: Mapping[str, object]) -> tuple[bytes, int, int, int]:
    """Salt, N, r and p of a passphrase-wrapped key record (the repository config's
    ``encryption``); KeyError or ValueError when the record lacks or garbles them or asks for
    more than :func:`check_cost` allows."""
    n, r, p = (int(str(wrapped[k])) for k in ("n", "r", "p"))
    check_cost(n, r, p)
    return bytes.fromhex(str(wrapped["salt"])), n, r, p


def read_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase from ``passphrase_file`` (trailing newline dropped), else from
    ``VMKEEP_PASSPHRASE``, else None; never from the command line."""
    if passphrase_file is not None:
        try:
            return passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read the passphrase file {passphrase_file}: {exc.strerror}") from None
    from vmkeep.settings import quick

    passphrase = quick("passphrase")  # read now (the demo sets one), without pydantic (the key prefetch)
    return passphrase.encode() if passphrase is not None else None
