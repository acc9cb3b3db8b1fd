"""Paging out memory-mapped weights a run has copied (``lorakit.memory``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit import memory
from lorakit.memory import HeapGuard, file_backed, file_mappings, keep_freed_memory, page_out


def resident_bytes(t: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds ``t`` (``/proc/self/smaps``)."""
    addr, found = t.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= addr < hi
            elif found and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.fixture
def mapped(tmp_path):
    """A 4 MiB fp32 tensor that is a private (copy-on-write) mapping of a file, as transformers
    gives a safetensors checkpoint's parameters."""
    path = tmp_path / "w.bin"
    values = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    values.tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")), torch.from_numpy(values)


def test_page_out_releases_a_mapped_tensor_and_keeps_its_values(mapped):
    t, values = mapped
    assert file_backed(t) and torch.equal(t, values)  # read: every page resident
    assert resident_bytes(t) >= t.numel() * 4
    advised = page_out(t, file_mappings())  # as the cast cache calls it, with mappings read once
    if advised == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT")
    assert advised == t.numel() * 4  # the array starts on a page: all of it
    assert resident_bytes(t) < 64 * 1024  # (a page or two may be touched again at once)
    assert torch.equal(t, values)  # read back from the file


def test_page_out_never_changes_a_value(mapped):
    """Written pages of a private mapping are the process's own (copy-on-write): paging them out
    must keep the written values, not revert to the file."""
    t, values = mapped
    t[::4096] = -1.0  # one value on every 16 KiB
    page_out(t)
    expected = values.clone()
    expected[::4096] = -1.0
    assert torch.equal(t, expected)


def test_page_out_leaves_other_memory_alone():
    anon = torch.randn(1 << 20)
    assert not file_backed(anon) and page_out(anon) == 0 and page_out(anon, file_mappings()) == 0
    small = torch.from_numpy(np.zeros(16, dtype=np.float32))
    assert page_out(small) == 0


def test_off_linux_there_are_no_file_mappings_and_nothing_is_paged_out(mapped, monkeypatch):
    """Where /proc/self/maps does not exist (macOS, Windows) the cast cache's release is a no-op."""
    import lorakit.memory

    t, values = mapped
    monkeypatch.setattr(lorakit.memory.sys, "platform", "darwin")
    assert file_mappings() == ([], []) and not file_backed(t) and page_out(t) == 0
    assert torch.equal(t, values)


def test_keep_freed_memory_sets_glibc_malloc_unless_told_not_to():
    """CPU training asks glibc to keep freed memory (mmap threshold 1 GiB, no trimming); a user's own
    MALLOC_* variables or LORAKIT_KEEP_FREED=0 leave the allocator alone, as does a libc without mallopt."""

    class Libc:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def mallopt(self, param: int, value: int) -> int:
            self.calls.append((param, value))
            return 1

    libc = Libc()
    assert keep_freed_memory({}, libc) is True
    assert libc.calls == [(-3, 2**30), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for env in ({"MALLOC_ARENA_MAX": "2"}, {"LORAKIT_KEEP_FREED": "0"}):
        quiet = Libc()
        assert keep_freed_memory(env, quiet) is False and quiet.calls == []
    assert keep_freed_memory({}, object()) is False  # no mallopt (not glibc)


def test_heap_guard_gives_freed_memory_back_only_past_the_slack():
    """The level is the highest resident set of the warm-up steps; a later step that leaves more
    than level + slack resident trims the heap (malloc_trim(0)), any other does not."""

    class Libc:
        def __init__(self) -> None:
            self.trims = 0

        def malloc_trim(self, pad: int) -> int:
            assert pad == 0
            self.trims += 1
            return 1

    mib = 2**20
    readings = iter([900 * mib, 1000 * mib,  # warm-up: level 1000 MiB
                     1100 * mib, 1128 * mib, 1129 * mib, 1000 * mib, 2000 * mib])
    libc = Libc()
    guard = HeapGuard(slack=128 * mib, warmup=2, lib=libc, resident=lambda: next(readings))
    done = [guard.after_step() for _ in range(7)]
    assert done == [False, False, False, False, True, False, True]
    assert guard.level == 1000 * mib and guard.trims == libc.trims == 2


def test_resident_bytes_counts_touched_memory():
    before = memory.resident_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page written
    assert memory.resident_bytes() - before >= 60 * 2**20
    del block
