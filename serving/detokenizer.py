"""Texts from token ids, as OpenVINO's detokenizer gives them, mostly without calling it.

A call of OpenVINO's detokenizer is an inference: ~0.5 ms right after a pipeline step (whose weights
have just gone through the caches), 2% of a one-stream step of the benchmark model, paid every step
(bench/ANALYSIS.md). A byte-level BPE detokenizer is one table lookup: its graph (VocabDecoder,
FuzeRagged, UTF8Validate, StringTensorPack, nothing else) maps each token it does not skip to its
bytes, joins them and replaces invalid UTF-8. So for ids it does not skip whose joined bytes are valid
UTF-8, the text is those bytes decoded (~25 µs a step in Python). The table is the graph's own
constants, read from the IR; any other graph, and any sequence with a skipped or unknown id or with
bytes that are not valid UTF-8 (half a character), goes to OpenVINO, all of a call's in one batch.
At load the table is checked against OpenVINO on sampled sequences; a disagreement turns it off.
"""

from __future__ import annotations

import logging
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

DETOKENIZER_XML = "openvino_detokenizer.xml"
# Every layer type of openvino_tokenizers' byte-level BPE detokenizer; another (a regex that cleans up
# spaces, SentencePiece's byte fallback) changes the text beyond the table.
_BYTE_LEVEL_GRAPH = frozenset(
    {"Parameter", "Convert", "Const", "VocabDecoder", "FuzeRagged", "UTF8Validate", "StringTensorPack", "Result"}
)
_DTYPES = {"i32": np.int32, "i64": np.int64, "u8": np.uint8}
_CHECK_SEQUENCES = 512


class Decoder(Protocol):
    def decode(self, tokens: list[list[int]]) -> list[str]: ...


@dataclass(frozen=True)
class ByteTable:
    """The bytes of each token id and the ids the detokenizer skips (its special tokens)."""

    pieces: list[bytes]
    skip: frozenset[int]

    def text(self, ids: list[int]) -> str | None:
        """The text of `ids`, or None where the table cannot say it exactly."""
        if not ids or not self.skip.isdisjoint(ids) or min(ids) < 0:
            return None
        try:
            return b"".join([self.pieces[i] for i in ids]).decode()
        except (IndexError, UnicodeDecodeError):
            return None


class Detokenizer:
    """`decode` gives exactly what `tokenizer.decode` gives; the byte table answers what it can."""

    def __init__(self, tokenizer: Decoder, folder: Path) -> None:
        self._tokenizer = tokenizer
        self.table: ByteTable | None = None
        try:
            table = read_byte_table(folder / DETOKENIZER_XML)
        except Exception as e:  # the table only saves time: an IR it cannot read still serves, through OpenVINO
            log.warning("detokenizer of %s not read (%r): every text goes through OpenVINO", folder, e)
            return
        if table is not None and _agrees(table, tokenizer):
            self.table = table

    def decode(self, seqs: list[list[int]]) -> list[str]:
        texts = [self.table.text(s) for s in seqs] if self.table else [None] * len(seqs)
        missing = [k for k, t in enumerate(texts) if t is None]
        if missing:
            for k, text in zip(missing, self._tokenizer.decode([seqs[k] for k in missing]), strict=True):
                texts[k] = text
        return texts  # type: ignore[return-value]  # every None was filled just above


def read_byte_table(xml: Path) -> ByteTable | None:
    """The byte table of a byte-level BPE detokenizer IR, or None for any other graph."""
    net = ET.parse(xml).getroot()
    layers = {layer.get("id"): layer for layer in net.iter("layer")}
    kinds = {layer.get("type") for layer in layers.values()}
    decoders = [layer for layer in layers.values() if layer.get("type") == "VocabDecoder"]
    if not kinds <= _BYTE_LEVEL_GRAPH or len(decoders) != 1:
        log.info("%s is not a byte-level BPE detokenizer (%s): its texts go through OpenVINO", xml, sorted(kinds))
        return None
    decoder = decoders[0].get("id")
    # VocabDecoder's inputs: ids, then the vocabulary's begins, ends and bytes, then (newer IRs) the skipped ids.
    sources = {
        int(edge.get("to-port", -1)): layers[edge.get("from-layer")]
        for edge in net.iter("edge")
        if edge.get("to-layer") == decoder
    }
    weights = xml.with_suffix(".bin").read_bytes()

    def constant(port: int) -> np.ndarray:
        layer = sources[port]
        if layer.get("type") != "Const":
            raise ValueError(f"VocabDecoder's input {port} is not a constant")
        data = layer.find("data")
        offset, size = int(data.get("offset")), int(data.get("size"))
        return np.frombuffer(weights[offset : offset + size], dtype=_DTYPES[data.get("element_type")])

    begins, ends, chars = constant(1), constant(2), constant(3)
    skip = {int(i) for i in constant(4)} if 4 in sources else set()
    attribute = decoders[0].find("data")
    if attribute is not None and attribute.get("skip_tokens"):
        skip |= {int(i) for i in attribute.get("skip_tokens").split(",")}
    raw = chars.tobytes()
    return ByteTable([raw[b:e] for b, e in zip(begins.tolist(), ends.tolist(), strict=True)], frozenset(skip))


def _agrees(table: ByteTable, tokenizer: Decoder) -> bool:
    """Whether the table gives OpenVINO's text for every sampled sequence it answers (a fixed sample)."""
    rng = random.Random(0)
    size = len(table.pieces)
    seqs = [[rng.randrange(size) for _ in range(rng.randint(1, 12))] for _ in range(_CHECK_SEQUENCES)]
    seqs += [[i] for i in range(min(size, _CHECK_SEQUENCES))]
    answered = [(s, t) for s in seqs if (t := table.text(s)) is not None]
    if not answered:
        return False  # nothing it could say: no use
    expected = tokenizer.decode([s for s, _ in answered])
    wrong = [s for (s, t), e in zip(answered, expected, strict=True) if t != e]
    if wrong:
        log.warning("the detokenizer's byte table disagrees with OpenVINO on %s: not used", wrong[:3])
    return not wrong
