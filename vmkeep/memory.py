"""Allocator settings for the NBD servers vmkeep starts (qemu-nbd, nbdkit).

A server answers each 4 MiB read with a fresh 4 MiB bounce buffer. With glibc's defaults a
buffer that size is mmapped, or trimmed back to the kernel as soon as it is freed, so every
request page-faults and zeroes it anew: about a thousand faults per chunk, and the server's
system time became the largest CPU cost of a backup on a small proxy. Keeping freed memory in
the allocator lets the next request reuse it; the server's working set stays bounded by the
requests in flight.
"""

from __future__ import annotations

import os

MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting; an 8 MiB chunk stays below it
TRIM_THRESHOLD = 512 << 20
TUNABLES = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def server_environment() -> dict[str, str]:
    """This process's environment with the allocator settings added (the caller's own
    GLIBC_TUNABLES are kept and win)."""
    env = dict(os.environ)
    own = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{TUNABLES}:{own}" if own else TUNABLES
    return env
