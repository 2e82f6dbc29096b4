"""Random and sequential reads of a point straight from the repository equal the disk's bytes,
with the cache bounded and zero chunks never fetched."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from tests.conftest import Cli, MiB
from vmkeep.lab.images import Segment
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.point_reader import PointReader
from vmkeep.repository.repo import Repository


def test_point_reads_equal_the_disk(cli: Cli, make_disk, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = make_disk(64 * MiB, [Segment(0, 20 * MiB, "random", "pr"), Segment(40 * MiB, 8 * MiB, "text", "pr")])
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    expected = raw.read_bytes()
    repo_path = str(tmp_path / "repo")
    cli.run("repo", "init", repo_path, "--encrypt")
    cli.json("disk", "backup", str(image), "--repo", repo_path, "--name", "d")
    repo = Repository.open(open_backend(repo_path), Credentials(cli.env["VMKEEP_PASSPHRASE"].encode()))
    reader = PointReader(repo, repo.find_point("d"), "disk", cache_chunks=4, read_ahead=2)
    try:
        assert reader.pread(64 * MiB, 0) == expected  # sequential, across every chunk
        rng = random.Random(3)
        for _ in range(200):  # random reads, crossing chunk edges
            offset = rng.randrange(0, 64 * MiB - 9000)
            length = rng.randrange(1, 9000)
            assert reader.pread(length, offset) == expected[offset:offset + length]
        assert len(reader._cache) <= reader.cache_chunks  # bounded, prefetched chunks included  # noqa: SLF001
        before = reader.fetched
        assert reader.pread(MiB, 24 * MiB) == bytes(MiB)  # a zero chunk: nothing fetched
        assert reader.fetched == before
        assert reader.extents(0, 64 * MiB)[0] == (0, 20 * MiB, False)
    finally:
        reader.close()
