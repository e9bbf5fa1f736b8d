"""Release the pages of an IR's memory-mapped weights once OpenVINO has copied them, so they stop counting as used.

OpenVINO's CPU plugin memory-maps an IR's `.bin` and, at the first inference, copies every
weight it multiplies into a packed layout of its own; it never reads those pages of the map
again (embedding rows aside). The pages stay resident in the process and are counted in its RSS
next to the copy: 3.6 GB on top of 3.5 GB for a 1.7 B-parameter fp16 IR. They are clean and
the kernel would drop them under pressure, but the build would look, and be limited by memory guards,
at twice its size. llama.cpp drops the map after its own repacking for the same reason.

While `released_pages` is active, a thread advises the kernel every `every_s` seconds that the
process no longer needs them (MADV_DONTNEED). On a read-only shared file map that only unmaps
the pages: a later read faults them back in from the page cache, so nothing can be lost and a
page still in use costs one minor fault. Linux only; elsewhere it does nothing. Used by the
gate's engine passes (tasks/validate.py, tasks/validate_adapter.py, with `released_pages`) and by
the serving engine between its steps (serving/engine_core.py, with `release`); here, beside the
repository contract, because both sides hold a version's weights this way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_MAPS = Path("/proc/self/maps")


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not _MAPS.exists():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def mapped_ranges(paths: Iterable[Path]) -> list[tuple[int, int]]:
    """(start, length) of this process's read-only memory maps of `paths`.

    Writable maps are left out: on a private one, MADV_DONTNEED would discard what was written.
    Read from /proc/self/maps, not psutil's memory_maps: that reads smaps, which counts the pages of
    every map (measured: 68 ms with a 3.6 GB map resident, against 0.24 ms), too slow for every `every_s`.
    """
    names = {str(Path(p).resolve()) for p in paths}
    ranges = []
    with contextlib.suppress(OSError), open(_MAPS) as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in names and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end - start))
    return ranges


def resident_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the maps of `paths` resident in this process now."""
    import psutil

    names = {str(Path(p).resolve()) for p in paths}
    return sum(m.rss for m in psutil.Process().memory_maps(grouped=True) if m.path in names)


def release(paths: Iterable[Path]) -> int:
    """Drop this process's resident pages of the read-only maps of `paths` now; the bytes of map released."""
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, length in mapped_ranges(paths):
        if madvise(start, length, _MADV_DONTNEED) == 0:
            released += length
    return released


@contextlib.contextmanager
def released_pages(paths: Iterable[Path], every_s: float = 0.2) -> Iterator[None]:
    """Release the maps of `paths` every `every_s` seconds while the block runs (its compiles and first inferences).

    Often rather than once at the end: the plugin copies the weights layer by layer during the
    first inference, and the peak is what a release afterwards would come too late for.
    """
    files = [Path(p) for p in paths]
    if _madvise() is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            release(files)

    thread = threading.Thread(target=loop, name="release-mapped-weights", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release(files)
