"""The engine's detokenizer gives OpenVINO's text for any token ids, through its byte table or through OpenVINO."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import openvino_genai as ov_genai
import pytest

import modelrepo
from serving.detokenizer import DETOKENIZER_XML, Detokenizer, read_byte_table
from tests.support import DemoRepository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(demo_repository: DemoRepository) -> Path:
    repo = demo_repository.root
    return repo / modelrepo.read_index(repo).entries["base_model"].path


def _kinds_of_sequences(tokenizer: ov_genai.Tokenizer, size: int) -> list[list[int]]:
    """Random ids (valid UTF-8 or not), special and unknown ids, nothing, and a multi-byte text cut at every token."""
    rng = random.Random(3)
    seqs = [[rng.randrange(size) for _ in range(rng.randint(1, 16))] for _ in range(3000)]
    accents = [int(i) for i in tokenizer.encode("déjà vu, naïve café — 日本語 ✓").input_ids.data[0]]
    seqs += [accents[:k] for k in range(1, len(accents) + 1)] + [accents[k:] for k in range(len(accents))]
    seqs += [[], [0], [1, 5, 2], [5, size], [size + 7], seqs[0] + [2] + seqs[1]]
    return seqs


def test_the_byte_table_gives_openvinos_text_and_answers_most_sequences(folder: Path) -> None:
    tokenizer = ov_genai.Tokenizer(str(folder))
    detokenizer = Detokenizer(tokenizer, folder)
    assert detokenizer.table is not None  # the demo's tokenizer is a byte-level BPE, as GPT-2's and Llama 3's are
    assert detokenizer.table.skip == {0, 1, 2}  # its special tokens, which OpenVINO's detokenizer leaves out
    seqs = _kinds_of_sequences(tokenizer, len(detokenizer.table.pieces))
    assert detokenizer.decode(seqs) == tokenizer.decode(seqs)
    answered = [s for s in seqs if detokenizer.table.text(s) is not None]
    # The table answers the common case; half characters, special and unknown ids went to OpenVINO.
    assert len(seqs) // 4 < len(answered) < len(seqs)
    assert tokenizer.decode([[1, 5, 2]]) == [detokenizer.table.text([5])]


def test_a_detokenizer_graph_the_table_does_not_cover_goes_through_openvino(folder: Path, tmp_path: Path) -> None:
    """A graph with a layer beyond byte-level BPE's (here a renamed one, as a space clean-up regex would be) has no
    table; a folder whose detokenizer cannot be read neither: both decode through OpenVINO, the same text."""
    xml = (folder / DETOKENIZER_XML).read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / DETOKENIZER_XML).write_text(xml.replace('type="UTF8Validate"', 'type="RegexNormalization"'))
    shutil.copy(folder / DETOKENIZER_XML.replace(".xml", ".bin"), other)
    assert read_byte_table(other / DETOKENIZER_XML) is None
    assert read_byte_table(folder / DETOKENIZER_XML) is not None

    tokenizer = ov_genai.Tokenizer(str(folder))
    missing = tmp_path / "missing"
    missing.mkdir()
    for place in (other, missing):
        detokenizer = Detokenizer(tokenizer, place)
        assert detokenizer.table is None
        seqs = _kinds_of_sequences(tokenizer, 1000)[-40:]
        assert detokenizer.decode(seqs) == tokenizer.decode(seqs)
