"""LLaVA's conversation JSON: stream-read it and validate each record.

LLaVA ships its data as one JSON array (``blip_laion_cc_sbu_558k.json``, ``llava_v1_5_mix665k.json``)
of records::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",          # optional; a list for several images
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt",   "value": "The bus is white and red."}, ...]}

A record without ``image`` is a text-only sample. Every ``<image>`` marker stands for one image,
in order. JSON Lines (one record per line, ``.jsonl``) is read as well.

`iter_json_records` never loads the whole file: it decodes one array element at a time with the
standard library's ``json.JSONDecoder.raw_decode`` over a sliding character buffer (``ijson`` is
not in the environment), so memory stays flat for the 1 GB mix665k file. Each element comes back
with its 0-based index and the 1-based line where it starts, so every error can name both.

`validate_record` turns a raw element into a `LlavaRecord` or raises `RecordError` with a short
machine-readable ``reason`` (counted and listed by the converter) and a human message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator, Optional

IMAGE_MARKER = "<image>"
HUMAN, GPT = "human", "gpt"

# Skip reasons (stable strings: they appear in the converter's report).
R_JSON_SYNTAX = "json_syntax"
R_NOT_OBJECT = "not_an_object"
R_MISSING_CONVERSATIONS = "missing_conversations"
R_BAD_CONVERSATIONS = "bad_conversations"
R_BAD_ROLES = "bad_roles"
R_BAD_IMAGE_FIELD = "bad_image_field"
R_TOO_MANY_MARKERS = "too_many_image_markers"
R_TOO_FEW_MARKERS = "too_few_image_markers"
R_MARKER_IN_ANSWER = "image_marker_in_answer"
R_TEMPLATE = "template_mismatch"
R_IMAGE_MISSING = "image_missing"
R_IMAGE_UNREADABLE = "image_unreadable"
R_IMAGE_CORRUPT = "image_corrupt"


class RecordError(ValueError):
    """A record that cannot be used. ``reason`` is one of the ``R_*`` constants."""

    def __init__(self, reason: str, message: str, *, index: Optional[int] = None, line: Optional[int] = None,
                 record_id: Optional[str] = None, source: Optional[str] = None):
        self.reason = reason
        self.message = message
        self.index = index
        self.line = line
        self.record_id = record_id
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.source is not None:
            where.append(f"{self.source}" + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.index is not None:
            where.append(f"record #{self.index}")
        if self.record_id is not None:
            where.append(f"id={self.record_id!r}")
        return f"{', '.join(where)}: {self.reason}: {self.message}" if where else f"{self.reason}: {self.message}"


@dataclasses.dataclass
class RawElement:
    """One element of the input file: either a decoded ``value`` or a syntax ``error``."""

    index: int  # 0-based position in the array / file (syntax errors get the index they occupy)
    line: int  # 1-based line where the element starts
    value: Any = None
    error: Optional[str] = None  # set for undecodable JSON
    end_line: Optional[int] = None  # for syntax errors: the line where reading resumed


@dataclasses.dataclass
class LlavaRecord:
    """A validated record, conversations normalised (see `validate_record`)."""

    id: str
    images: list[str]  # relative paths, in marker order; empty for text-only samples
    conversations: list[dict]  # [{"from": "human"|"gpt", "value": str}], alternating, human first
    index: int
    line: int

    @property
    def text_only(self) -> bool:
        return not self.images


_WS = re.compile(r"\s*")


def _is_jsonl(path: str, first_char: str) -> bool:
    if path.endswith(".jsonl"):
        return True
    return first_char == "{"


def iter_json_records(path: str | os.PathLike, *, chunk_chars: int = 1 << 20,
                      max_record_chars: int = 64 << 20) -> Iterator[RawElement]:
    """Yield the elements of a LLaVA JSON array (or JSON Lines file) one by one.

    Memory: one chunk plus the largest record. A syntax error inside the array does not stop the
    stream: the element is yielded with ``error`` set, and reading resumes at the next object that
    looks like a record (a JSON object with an ``id`` or ``conversations`` key that follows a
    comma). Records swallowed by the resynchronisation are not silently lost: the error element
    says which lines were skipped. In JSON Lines a bad line is one element with ``error``.
    """
    path = os.fspath(path)
    with open(path, "r", encoding="utf-8") as f:
        head = f.read(4096)
        stripped = head.lstrip()
        if not stripped:
            raise RecordError(R_JSON_SYNTAX, "file is empty", source=path, line=1)
        f.seek(0)
        if _is_jsonl(path, stripped[0]):
            yield from _iter_jsonl(f)
        elif stripped[0] == "[":
            yield from _iter_array(f, path, chunk_chars, max_record_chars)
        else:
            raise RecordError(R_JSON_SYNTAX, f"expected a JSON array '[' or JSON Lines, found {stripped[0]!r}",
                              source=path, line=1 + head[: len(head) - len(stripped)].count("\n"))


def _iter_jsonl(f) -> Iterator[RawElement]:
    index = 0
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield RawElement(index=index, line=line_no, value=json.loads(line))
        except json.JSONDecodeError as e:
            yield RawElement(index=index, line=line_no, error=f"{e.msg} (column {e.colno})", end_line=line_no)
        index += 1


class _Buffer:
    """A sliding window over a text file that keeps track of line numbers."""

    def __init__(self, f, chunk_chars: int):
        self.f = f
        self.chunk = chunk_chars
        self.buf = ""
        self.pos = 0  # cursor in buf
        self.eof = False
        self.line_base = 1  # line number at buf[0]
        self._line_cursor = 0
        self._line_at_cursor = 1

    def fill(self) -> bool:
        """Read one more chunk (dropping the consumed prefix). False at end of file."""
        if self.eof:
            return False
        if self.pos > 0:
            self.line_base = self.line_at(self.pos)
            self.buf = self.buf[self.pos:]
            self.pos = 0
            self._line_cursor, self._line_at_cursor = 0, self.line_base
        data = self.f.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line_at(self, pos: int) -> int:
        if pos < self._line_cursor:
            self._line_cursor, self._line_at_cursor = 0, self.line_base
        self._line_at_cursor += self.buf.count("\n", self._line_cursor, pos)
        self._line_cursor = pos
        return self._line_at_cursor

    def skip_ws(self) -> Optional[str]:
        """Advance past whitespace; return the next character (None at end of file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None


def _iter_array(f, path: str, chunk_chars: int, max_record_chars: int) -> Iterator[RawElement]:
    decoder = json.JSONDecoder()
    b = _Buffer(f, chunk_chars)
    b.fill()
    b.skip_ws()
    b.pos += 1  # the '['
    index = 0
    expect_value = True
    resync_cap = min(max_record_chars, max(4 * chunk_chars, 1 << 20))
    while True:
        c = b.skip_ws()
        if c is None:  # reported as one more bad element, so that the records before it still count
            yield RawElement(index=index, line=b.line_at(b.pos), end_line=b.line_at(b.pos),
                             error="unexpected end of file: the array is not closed with ']'")
            return
        if c == "]":  # end of the array (a trailing comma before it is tolerated)
            return
        if not expect_value:
            if c == ",":
                b.pos += 1
                expect_value = True
                continue
            err_line = b.line_at(b.pos)
            yield _resync(b, decoder, index, err_line, f"expected ',' or ']' after a record, found {c!r}",
                          resync_cap)
            index += 1
            expect_value = True
            continue
        start_line = b.line_at(b.pos)
        value, err, _ = _decode_one(b, decoder, max_record_chars)
        if err is None:
            yield RawElement(index=index, line=start_line, value=value)
            expect_value = False
        else:
            yield _resync(b, decoder, index, start_line, err, resync_cap)
            expect_value = True
        index += 1


def _decode_one(b: _Buffer, decoder: json.JSONDecoder, max_chars: int):
    """Decode the value at the cursor, reading more of the file while it may be incomplete.

    Returns ``(value, error, start)``: ``start`` is the value's first character in the buffer as it
    is now (a refill drops the consumed prefix, so it can differ from the cursor on entry). On
    success the cursor moves past the value; on failure it stays at ``start``."""
    while True:
        start = b.pos
        try:
            value, end = decoder.raw_decode(b.buf, start)
            b.pos = end
            return value, None, start
        except json.JSONDecodeError as e:
            if b.eof or len(b.buf) - b.pos > max_chars:
                col = e.pos - b.buf.rfind("\n", 0, e.pos)
                return None, f"{e.msg} (line {b.line_at(e.pos)}, column {col})", start
            b.fill()  # at end of file this sets eof: decode once more and report


_RESYNC = re.compile(r",\s*\{")


def _resync(b: _Buffer, decoder: json.JSONDecoder, index: int, line: int, message: str,
            max_chars: int) -> RawElement:
    """After a syntax error, move the cursor to the next element that decodes to a record-like
    object (an object with an ``id`` or ``conversations`` key after a comma); the returned error
    element reports the lines that were skipped."""
    b.pos += 1
    while True:
        m = _RESYNC.search(b.buf, b.pos)
        if m is None:
            b.pos = max(b.pos, len(b.buf) - 256)  # keep a tail that may hold a split ", {"
            if not b.fill():
                close = b.buf.rfind("]")
                b.pos = close if close >= b.pos else len(b.buf)
                return RawElement(index=index, line=line, error=message, end_line=b.line_at(b.pos))
            continue
        b.pos = m.end() - 1  # the '{'
        value, err, start = _decode_one(b, decoder, max_chars)
        if err is not None:
            b.pos = start + 1
            continue
        if isinstance(value, dict) and ("id" in value or "conversations" in value):
            b.pos = start  # the main loop decodes this record again
            return RawElement(index=index, line=line, error=message, end_line=b.line_at(b.pos))
        # a nested object (e.g. a turn of the broken record): scan on from its end


def _count_markers(text: str) -> int:
    return text.count(IMAGE_MARKER)


def validate_record(raw: RawElement, *, template: Optional[str] = None, source: Optional[str] = None) -> LlavaRecord:
    """Check one element and normalise it.

    Rules (each failure is a `RecordError` with the reason in brackets):
    - the element decoded [json_syntax] and is an object [not_an_object];
    - ``conversations`` is present [missing_conversations], a non-empty list of
      ``{"from", "value": str}`` [bad_conversations], roles alternate human, gpt, human, ... with at
      least one answered question [bad_roles]; as in LLaVA's ``preprocess``, a leading gpt turn is
      dropped, and so is a trailing unanswered human turn (it follows every supervised token);
    - ``image``, when present, is a non-empty string or a non-empty list of them [bad_image_field];
    - ``<image>`` markers appear only in human turns [image_marker_in_answer] and their number equals
      the number of images [too_many_image_markers / too_few_image_markers]. One exception,
      as in LLaVA-NeXT: a record with one image and no marker gets ``<image>\\n`` in front of its
      first human turn;
    - one image and one marker: as in LLaVA-1.5's ``preprocess_multimodal`` the marker is moved to
      the front of its turn followed by a newline (``"Q <image>"`` -> ``"<image>\\nQ"``);
    - template ``plain`` (stage-1 captions) needs exactly one image and one human/gpt pair [template_mismatch].
    """
    if raw.error is not None:
        raise RecordError(R_JSON_SYNTAX, raw.error, index=raw.index, line=raw.line, source=source)
    rec = raw.value

    def fail(reason, msg):
        rid = rec.get("id") if isinstance(rec, dict) else None
        raise RecordError(reason, msg, index=raw.index, line=raw.line, source=source,
                          record_id=None if rid is None else str(rid))

    if not isinstance(rec, dict):
        fail(R_NOT_OBJECT, f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" not in rec:
        fail(R_MISSING_CONVERSATIONS, "the record has no 'conversations' key")
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv:
        fail(R_BAD_CONVERSATIONS, "'conversations' must be a non-empty list")
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            fail(R_BAD_CONVERSATIONS, f"turn {j} must be an object with 'from' and 'value'")
        if not isinstance(t["value"], str):
            fail(R_BAD_CONVERSATIONS, f"turn {j}: 'value' must be a string, got {type(t['value']).__name__}")
        turns.append({"from": t["from"], "value": t["value"]})
    offset = 0
    if turns[0]["from"] == GPT:  # LLaVA's preprocess drops a leading gpt turn too
        turns, offset = turns[1:], 1
    for j, t in enumerate(turns):
        expected = HUMAN if j % 2 == 0 else GPT
        if t["from"] != expected:
            fail(R_BAD_ROLES, f"turn {j + offset} is from {t['from']!r}, expected {expected!r} "
                              "(turns alternate human, gpt)")
    if len(turns) % 2:  # a last question without answer: it follows every supervised token, so
        turns = turns[:-1]  # dropping it changes nothing in training (LLaVA keeps it, unsupervised)
    if not turns:
        fail(R_BAD_ROLES, "no human turn followed by a gpt turn")

    images = rec.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or any(not isinstance(p, str) or not p for p in images) or (
        "image" in rec and rec["image"] is not None and not images
    ):
        fail(R_BAD_IMAGE_FIELD, f"'image' must be a path or a non-empty list of paths, got {rec.get('image')!r}")

    for j, t in enumerate(turns):
        if t["from"] == GPT and IMAGE_MARKER in t["value"]:
            fail(R_MARKER_IN_ANSWER, f"turn {j} (gpt) contains {IMAGE_MARKER!r}")
    markers = sum(_count_markers(t["value"]) for t in turns)
    if markers > len(images):
        fail(R_TOO_MANY_MARKERS, f"{markers} {IMAGE_MARKER!r} marker(s) but {len(images)} image(s)")
    if markers < len(images):
        if markers == 0 and len(images) == 1:
            turns[0]["value"] = IMAGE_MARKER + "\n" + turns[0]["value"]
        else:
            fail(R_TOO_FEW_MARKERS, f"{markers} {IMAGE_MARKER!r} marker(s) but {len(images)} image(s)")
    if len(images) == 1:
        for t in turns:
            if IMAGE_MARKER in t["value"]:
                t["value"] = IMAGE_MARKER + "\n" + t["value"].replace(IMAGE_MARKER, "").strip()
                break

    if template == "plain":
        if len(images) != 1 or len(turns) != 2:
            fail(R_TEMPLATE, f"template 'plain' needs one image and one human/gpt pair, got {len(images)} "
                             f"image(s) and {len(turns)} turn(s)")

    rid = rec.get("id")
    rid = str(rid) if rid is not None else f"#{raw.index}"
    return LlavaRecord(id=rid, images=list(images), conversations=turns, index=raw.index, line=raw.line)
