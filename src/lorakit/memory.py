"""Handing memory a CPU run no longer reads back to the operating system.

transformers maps a safetensors checkpoint into memory and, where the stored dtype is the one
asked for, its parameters are views of that mapping: their pages are the file's, read in on
first touch and counted in the process's resident memory (RSS) from then on. Under bf16 training
on a CPU the trainer reads each frozen fp32 projection weight once, to round it to bf16
(``kernels.cast``), and never again during the run; ``page_out`` then asks the kernel to reclaim
those pages (``madvise(MADV_PAGEOUT)``). They are clean copies of the file, so nothing is lost: a
later read (evaluation in fp32, merging, export) faults them back in from the page cache or the
file. Pages that were written to, or that belong to anonymous memory, are left to the kernel
as well (without swap it keeps them), so the call can never change a value.

The heap's side of the same policy: a CPU training process asks glibc to keep the memory it
frees for reuse (``keep_freed_memory``), since every step allocates and frees the same large
temporaries, and gives it back once the steps are over (``return_freed_memory``).
Kept memory can fragment: with the fp32 products on oneDNN the heap's resident size crept up by
0.3-0.6 GiB over the demo's 63 steps while the live peak stayed put (oneDNN's own caches hold
about 1 MB per product shape, and training has few shapes; the rest is free memory in pieces). ``HeapGuard`` bounds that: it gives the freed
memory back whenever the resident set rises more than a slack above its level after the first
steps, so reuse stays the rule and growth the exception.
``peak_memory_bytes`` is what the trainer reports: peak RSS on a CPU, peak allocated on a GPU.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

_MADV_PAGEOUT = 21  # Linux ≥ 5.4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIN_BYTES = 1 << 20  # smaller tensors are not worth a system call


Mappings = tuple[list[int], list[int]]


@functools.cache
def libc() -> Any:
    """The C library's symbols (``malloc_trim``, ``mallopt``, ``madvise``) through ctypes, or None."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def file_mappings() -> Mappings:
    """Sorted (starts, ends) of this process's private file-backed mappings (``/proc/self/maps``;
    none where there is no such file, as off Linux)."""
    starts: list[int] = []
    ends: list[int] = []
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps"):
        return starts, ends
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # address perms offset dev inode [path]; inode 0 is anonymous memory, [heap] and the like
            if len(fields) < 6 or fields[4] == "0" or fields[1][3] != "p" or fields[5].startswith("["):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            starts.append(lo)
            ends.append(hi)
    return starts, ends


def file_backed(t: torch.Tensor, mappings: Mappings | None = None) -> bool:
    """Whether all of ``t``'s bytes lie in one private file mapping (a memory-mapped checkpoint);
    ``mappings``: a ``file_mappings()`` taken earlier (reading them costs ~1 ms)."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    starts, ends = file_mappings() if mappings is None else mappings
    i = bisect.bisect_right(starts, lo) - 1
    return i >= 0 and hi <= ends[i]


def page_out(t: torch.Tensor, mappings: Mappings | None = None) -> int:
    """Ask the kernel to reclaim the whole pages of ``t`` when ``t`` is a view of a memory-mapped
    file and at least ``MIN_BYTES``; returns the bytes advised (0 where nothing was done). The
    values stay readable: they come back from the file on the next read. (With stale ``mappings``
    the worst case is advice on memory that is no longer the file's, which the kernel honours
    without changing a value: anonymous pages go to swap, if any.)"""
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or not file_backed(t, mappings):
        return 0
    start = -(-t.data_ptr() // _PAGE) * _PAGE
    length = (t.data_ptr() + nbytes) // _PAGE * _PAGE - start
    madvise = getattr(libc(), "madvise", None)
    if madvise is None or length <= 0:
        return 0
    return length if madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_PAGEOUT) == 0 else 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory (GPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory(environ: Any = None, lib: Any = None) -> bool:
    """Let glibc's malloc reuse freed memory instead of returning it to the OS, for a CPU training
    process: every allocation below 1 GiB from the heap (not a fresh mmap) and no trimming. A CPU
    step allocates and frees the same large temporaries (the (N, 4H) MLP buffers, the head's
    chunks) step after step; by default each is a fresh mapping whose pages fault in on first touch.
    Measured on the demo's data (2-core AVX-512, lorakit's side of train_vs_peft): 7-9% faster fp32
    training, peak RSS +0.01-0.02 GiB. Returns whether it was applied: not where the user set ``MALLOC_*`` variables
    or ``LORAKIT_KEEP_FREED=0``, nor without glibc."""
    environ = os.environ if environ is None else environ
    if environ.get("LORAKIT_KEEP_FREED", "1") == "0" or any(k.startswith("MALLOC_") for k in environ):
        return False
    mallopt = getattr(libc() if lib is None else lib, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 2**30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# glibc's own policy moves the mmap threshold up to 32 MiB (64-bit) as large blocks are freed, with
# the trim threshold at twice it; mallopt switches that adaptation off for good, so the end of
# training sets its ceiling values
_MMAP_AFTER, _TRIM_AFTER = 32 * 2**20, 64 * 2**20


def stop_keeping_freed_memory(lib: Any = None) -> bool:
    """End ``keep_freed_memory``'s policy once the steps are over: blocks of 32 MiB and more are
    mapped and unmapped on their own again, the heap's top is trimmed past 64 MiB free, and the
    free memory goes back now (``return_freed_memory``). Evaluation and generation after training
    allocate in other sizes than the steps did (a growing KV cache, a batch's logits); in the heap
    the steps left behind, with nothing trimmed, the demo's closing evaluation peaked at 2.65 GiB
    RSS, above training's own 2.46; with this, 2.16 GiB, in the same time. Returns whether
    glibc took the settings."""
    mallopt = getattr(libc() if lib is None else lib, "mallopt", None)
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_AFTER)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER))
    return_freed_memory(lib)
    return applied


def return_freed_memory(lib: Any = None) -> bool:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim(0)``): what
    ``keep_freed_memory`` kept for the training steps' reuse, when ``HeapGuard`` sees it grow and
    once the steps are over. Returns whether glibc released anything."""
    trim = getattr(libc() if lib is None else lib, "malloc_trim", None)
    return trim is not None and bool(trim(0))


def resident_bytes() -> int:
    """This process's resident set in bytes (``/proc/self/statm``; 0 where there is no such file)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class HeapGuard:
    """Keeps ``keep_freed_memory``'s reuse from turning into growth over a run.

    ``level`` is the highest resident set seen after each of the first ``warmup`` steps (the heap
    then holds one step's temporaries). After every later step, if the resident set exceeds
    ``level + slack``, the heap's free memory goes back to the OS (``return_freed_memory``) and the
    next steps fault in again only what they use. Measured on the demo (fp32 products on oneDNN,
    63 steps, 2 cores): training's peak RSS 2.43-2.48 GiB instead of 2.76-2.92 (2.35 on the BLAS,
    whose heap does not creep), about 15 trims, the same 1.7-1.8 min; trimming after every step instead also gives 2.35 GiB
    but takes 2.1 min."""

    def __init__(self, slack: int = 128 * 2**20, warmup: int = 2, lib: Any = None,
                 resident: Callable[[], int] = resident_bytes) -> None:
        self.slack, self.warmup, self.lib, self.resident = slack, warmup, lib, resident
        self.level, self.steps, self.trims = 0, 0, 0

    def after_step(self) -> bool:
        """Call once after each optimizer step; returns whether freed memory was given back."""
        self.steps += 1
        rss = self.resident()
        if self.steps <= self.warmup:
            self.level = max(self.level, rss)
            return False
        if rss <= self.level + self.slack:
            return False
        self.trims += 1
        return_freed_memory(self.lib)
        return True
