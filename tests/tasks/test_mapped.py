"""Releasing an IR's mapped weights: the pages stop counting in RSS, and nothing read through the map changes."""

from __future__ import annotations

import mmap
import os
import sys
import time
from pathlib import Path

import pytest

from modelrepo.mapped import mapped_ranges, release, released_pages, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED on /proc/self/maps: Linux")


def test_release_drops_the_resident_pages_and_keeps_the_contents(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    body = os.urandom(8 << 20)
    path.write_bytes(body)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        assert bytes(view) == body  # every page read: resident
        assert resident_bytes([path]) == len(body)
        assert mapped_ranges([path]) and release([path]) >= len(body)
        assert resident_bytes([path]) == 0
        assert bytes(view) == body  # read back from the page cache


def test_writable_maps_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as view:
        view[:4] = b"kept"  # a private copy-on-write page: MADV_DONTNEED would throw the write away
        assert mapped_ranges([path]) == [] and release([path]) == 0
        assert view[:4] == b"kept"


def test_the_engine_answers_the_same_with_its_weights_released(demo_repository) -> None:
    from modelrepo.numerics import default_numerics
    from tasks.engine import genai_greedy, genai_pipeline

    ir = demo_repository.root / "merged_model" / "1"
    weights = ir / "openvino_model.bin"
    prompt = [[1, *range(300, 340)]]
    numerics = default_numerics()
    kept = genai_pipeline(ir, numerics)
    want = genai_greedy(kept, prompt, 16)
    held = resident_bytes([weights])
    del kept
    with released_pages([weights], every_s=0.05):
        pipe = genai_pipeline(ir, numerics)
        assert genai_greedy(pipe, prompt, 16) == want
        # While the block runs, the releasing thread keeps the map from growing back.
        deadline = time.monotonic() + 10
        while (released := resident_bytes([weights])) > weights.stat().st_size / 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert genai_greedy(pipe, prompt, 16) == want  # and after: whatever the engine still reads faults back in
    del pipe
    size = weights.stat().st_size
    assert held > size / 2, f"the map held {held} of {size} bytes: the engine no longer maps its weights?"
    assert released < size / 10
