"""models/atomic.py: the one atomic-write helper behind results, shards, banks, references and quantized states."""

import errno
import threading

import numpy as np
import pytest

from models.atomic import DiskFullError, atomic_path, write_text_atomic


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "sub" / "a.npz"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp.suffix == ".npz" and tmp.name.startswith(".")
        np.savez(tmp, x=np.arange(3))  # the suffix is kept, so numpy adds none
    assert np.load(p)["x"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        np.savez(tmp, x=np.arange(5))
        raise RuntimeError("killed mid-write")
    assert np.load(p)["x"].tolist() == [0, 1, 2]
    assert sorted(f.name for f in p.parent.iterdir()) == ["a.npz"]  # no temporary left behind


def test_disk_full_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "results.json"
    with pytest.raises(DiskFullError) as e, atomic_path(p, need_bytes=3 * 2**20) as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"disk full writing {p}: about 3.0 MiB more needed") and "\n" not in str(e.value)
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    p, names = tmp_path / "m.json", []
    together = threading.Barrier(8)  # all eight are inside their write at once

    def write(i):
        with atomic_path(p) as tmp:
            names.append(tmp.name)
            tmp.write_text(str(i))
            together.wait(timeout=30)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and p.read_text() in {str(i) for i in range(8)}
    write_text_atomic(p, "done")
    assert p.read_text() == "done"
