"""Read data sources and normalize their records, with errors that name the file, record and field.

Every record becomes one of three shapes:
  alpaca: {"instruction": str, "input": str, "output": str}
  chat:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  text:   {"text": str}
Dialogue (a list of turns, speakers alternating) and other layouts are converted to `chat` here.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loraforge.errors import DataError

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
KIND_OF_FORMAT = {"alpaca": "alpaca", "chat": "chat", "dialogue": "chat", "oasst": "chat", "text": "text"}


@dataclass(frozen=True)
class RawRecord:
    """A record as read, with where it came from (for error messages)."""

    data: Any
    source: str
    index: int  # 1-based line number for JSONL/text, 0-based record index otherwise

    @property
    def where(self) -> str:
        if ", line " in self.source:  # JSONL / text: the source already names the line
            return self.source
        return f"{self.source}, record {self.index}"


class InvalidRecord(DataError):
    """One record cannot be used; `skip_invalid` counts it instead of stopping."""


# ------------------------------------------------------------------------------------------- reading files
# A data file may come from anyone: it is read as text in the encodings editors write (UTF-8 with or without
# a byte-order mark, UTF-16/32 with one), gzip-compressed or not, and anything else stops with a message
# naming the file and line instead of a UnicodeDecodeError.

GZIP_MAGIC = b"\x1f\x8b"
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: FF FE 00 00
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # EOFError: a truncated .gz


def data_suffix(path: Path) -> str:
    """The suffix that names a file's format: '.jsonl' for both train.jsonl and train.jsonl.gz."""
    return Path(path.name.lower().removesuffix(".gz")).suffix


def _open_bytes(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzip (by content, whatever its name)."""
    with path.open("rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else path.open("rb")


def _utf8_prefix(head: bytes) -> bool:
    """Whether `head` (the start of a file) is UTF-8, allowing a character cut at its end."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def _encoding(path: Path, head: bytes) -> str:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    # NUL bytes in valid UTF-8 are a malformed line, left to the line's reader (it names the line); NULs
    # among bytes that are not UTF-8 are a file that is not text at all.
    if b"\x00" in head and not _utf8_prefix(head):
        raise DataError(f"{path}: this is a binary file (or UTF-16 without a byte-order mark), not text. Data files "
                        "must be UTF-8 (or UTF-16 with a byte-order mark), optionally gzip-compressed.")
    return "utf-8-sig"


def text_lines(path: Path) -> Iterator[tuple[int, str | InvalidRecord]]:
    """(line number, line with its line end) for every line of a text file. A line that is not valid text in
    the file's encoding comes as an InvalidRecord naming the file and line, so JSON Lines can skip it."""
    try:
        with _open_bytes(path) as f:
            head = f.read(4096)
            encoding = _encoding(path, head)
            f.seek(0)
            if encoding == "utf-8-sig":
                # Decoded line by line (not through a TextIOWrapper, which decodes 8 KiB at a time), so a bad
                # byte is reported on its own line and only that line is lost.
                for lineno, raw in enumerate(f, 1):
                    try:
                        yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        yield lineno, InvalidRecord(f"{path}, line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                                    f"at column {e.start + 1}). Save the file as UTF-8.")
                return
            lineno = 0
            try:
                for lineno, line in enumerate(io.TextIOWrapper(f, encoding=encoding, newline=""), 1):
                    yield lineno, line
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, after line {lineno}: not valid {encoding.upper()} text "
                                f"({e.reason}).") from None
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: a broken or truncated gzip file ({type(e).__name__}: {e}).") from None


def strict_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`text_lines` where any line that is not text stops the reading (CSV, plain text, one JSON document)."""
    for lineno, line in text_lines(path):
        if isinstance(line, InvalidRecord):
            raise DataError(str(line))
        yield lineno, line


def _head(path: Path, size: int = 1024) -> str:
    """The first characters of a text file (for telling a JSON array from JSON Lines)."""
    try:
        with _open_bytes(path) as f:
            raw = f.read(size * 4)
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: a broken or truncated gzip file ({type(e).__name__}: {e}).") from None
    return raw.decode(_encoding(path, raw), errors="ignore")[:size]


def _loads(text: str, where: str) -> Any:
    """json.loads, with nesting too deep for Python's recursion limit reported as a bad record."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidRecord(f"{where}: the JSON is nested too deeply (over ~1000 levels) to be a record.") from None


def read_json_file(path: Path) -> Iterator[RawRecord]:
    """A `.jsonl` file is JSON Lines, one record a line, whatever a line holds. A `.json` file is a JSON
    array, an object holding one list, one record, or JSON Lines, decided by the content."""
    head = _head(path).lstrip()
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        yield from _json_lines(path, array_hint=head.startswith("["))
        return
    if head.startswith("["):
        for i, rec in enumerate(iter_json_array(path)):
            yield RawRecord(rec, str(path), i)
        return
    if head.startswith("{") and suffix == ".json":
        try:
            data = _loads("".join(line for _, line in strict_lines(path)), str(path))
        except json.JSONDecodeError:
            data = None  # not one object: fall through to JSON Lines
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1 and not {"messages", "conversations", "instruction", "text", "dialog"} & set(data):
                for i, rec in enumerate(lists[0]):
                    yield RawRecord(rec, str(path), i)
            else:
                yield RawRecord(data, str(path), 0)
            return
    yield from _json_lines(path)


# A JSON array is parsed one element at a time from chunks of decoded text (json's raw_decode at the element's
# start; an element cut by the chunk's end is retried with the next chunk appended), so a file of any size is
# read in memory bounded by its largest record. An element that still fails once it spans this much text is
# an error, so a broken file is not read whole before it is reported.
JSON_CHUNK_CHARS = 1 << 20
JSON_RECORD_LIMIT = 64 << 20


def _text_chunks(path: Path, size: int) -> Iterator[str]:
    """The file's text in chunks of `size` characters, decoded as `text_lines` decodes it."""
    try:
        with _open_bytes(path) as f:
            head = f.read(4096)
            encoding = _encoding(path, head)
            f.seek(0)
            reader = io.TextIOWrapper(f, encoding=encoding, newline="")
            read = 0
            try:
                while chunk := reader.read(size):
                    read += len(chunk)
                    yield chunk
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, after character {read}: not valid {encoding.upper().removesuffix('-SIG')} "
                                f"text ({e.reason}). Save the file as UTF-8.") from None
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: a broken or truncated gzip file ({type(e).__name__}: {e}).") from None


def iter_json_array(path: Path, chunk_chars: int = JSON_CHUNK_CHARS) -> Iterator[Any]:
    """The elements of a file holding one top-level JSON array, parsed incrementally (see above). Errors name
    the line and column in the file, as json's own messages do for a file read whole."""
    decoder = json.JSONDecoder()
    text = _ArrayText(_text_chunks(path, chunk_chars), chunk_chars)
    expect, count = "[", 0  # "[" at the start; then "value"; then "," or "]"
    while True:
        if not text.skip_space():
            what = "the array's opening '['" if expect == "[" else "the end of the array (']')"
            raise DataError(f"{path}: invalid JSON: the file ends before {what}.")
        ch = text.buf[text.at]
        if ch == "]" and (expect == "," or (expect == "value" and count == 0)):
            text.at += 1
            if text.skip_space():
                text.fail(path, text.at, "Extra data")
            return
        if expect in ("[", ","):
            if ch != expect:
                text.fail(path, text.at, "Expecting ',' delimiter" if expect == "," else "Expecting '['")
            text.at += 1
            expect = "value"
            continue
        try:
            value, end = decoder.raw_decode(text.buf, text.at)
        except json.JSONDecodeError as e:
            # Cut by the chunk's end, or broken: read on (up to the record limit) before calling it broken.
            if len(text.buf) - text.at < JSON_RECORD_LIMIT and text.read_more():
                continue
            text.fail(path, e.pos, e.msg)
        except RecursionError:
            raise InvalidRecord(f"{path}, record {count}: the JSON is nested too deeply (over ~1000 levels) to be a "
                                "record.") from None
        if _number_may_go_on(value, text.buf, end) and text.read_more():  # "-2500." + "5]": parse again
            continue
        yield value
        text.at, expect, count = end, ",", count + 1


def _number_may_go_on(value: Any, buf: str, end: int) -> bool:
    """Whether a number parsed from `buf` may be the prefix of a longer one cut by the chunk's end."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    while end < len(buf) and buf[end] in "0123456789+-.eE":
        end += 1
    return end == len(buf)


class _ArrayText:
    """The window of a JSON array's text being parsed: `buf[at:]` is unparsed; text before `at` is dropped as
    the window moves on, keeping the line and column it ended at for error messages."""

    def __init__(self, chunks: Iterator[str], chunk_chars: int):
        self.chunks, self.chunk_chars = chunks, chunk_chars
        self.buf, self.at, self.done = "", 0, False
        self.lines_before, self.cols_before = 0, 0

    def read_more(self) -> bool:
        if self.done:
            return False
        if self.at > self.chunk_chars:
            dropped = self.buf[:self.at]
            nl = dropped.rfind("\n")
            if nl >= 0:
                self.lines_before += dropped.count("\n")
                self.cols_before = len(dropped) - nl - 1
            else:
                self.cols_before += len(dropped)
            self.buf, self.at = self.buf[self.at:], 0
        nxt = next(self.chunks, None)
        if nxt is None:
            self.done = True
            return False
        self.buf += nxt
        return True

    def skip_space(self) -> bool:
        """Move past whitespace; False at the end of the file."""
        while True:
            while self.at < len(self.buf) and self.buf[self.at] in " \t\r\n":
                self.at += 1
            if self.at < len(self.buf):
                return True
            if not self.read_more():
                return False

    def fail(self, path: Path, pos: int, msg: str) -> None:
        nl = self.buf.rfind("\n", 0, pos)
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        col = pos - nl if nl >= 0 else self.cols_before + pos + 1
        raise DataError(f"{path}: invalid JSON at line {line}, column {col}: {msg}.")


def _json_lines(path: Path, *, array_hint: bool = False) -> Iterator[RawRecord]:
    """JSON Lines. `array_hint`: the file starts with '[' — if its first line is not JSON on its own, it is
    most likely one pretty-printed array, and the user is told to name it .json rather than shown every
    line as invalid."""
    first = True
    for lineno, line in text_lines(path):
        where = f"{path}, line {lineno}"
        if isinstance(line, InvalidRecord):
            yield RawRecord(line, where, lineno)
            first = False
            continue
        if not line.strip():
            continue
        try:
            yield RawRecord(_loads(line, where), where, lineno)
        except InvalidRecord as e:
            yield RawRecord(e, where, lineno)
        except json.JSONDecodeError as e:
            if first and array_hint:
                raise DataError(f"{path}: line 1 is not a JSON value on its own: the file looks like one JSON "
                                "array, not JSON Lines. Rename it to .json.") from None
            yield RawRecord(InvalidRecord(f"{where}: invalid JSON ({e.msg}, column {e.colno})."), where, lineno)
        first = False


# ------------------------------------------------------------------------------------------- normalizing


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, str):
        return "text"
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    keys = set(record)
    if "instruction" in keys or {"output"} <= keys:
        return "alpaca"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "dialog" in keys or "dialogue" in keys or "turns" in keys:
        return "dialogue"
    if "message_id" in keys and "parent_id" in keys:
        return "oasst"
    if "text" in keys:
        return "text"
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(keys)}. Set data.format "
                    "(alpaca: instruction/input/output; chat: messages; dialogue: dialog; text: text), "
                    "or map your columns with data.column_mapping.")


def _field(record: dict[str, Any], name: str, where: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if name not in record or record[name] is None:
        if required:
            raise InvalidRecord(f"{where}: missing field '{name}'.")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise InvalidRecord(f"{where}: field '{name}' must be a string, got {type(value).__name__} "
                            f"({str(value)[:40]!r}).")
    if required and not allow_empty and not value.strip():
        raise InvalidRecord(f"{where}: field '{name}' is empty.")
    return value


def normalize_alpaca(record: dict[str, Any], where: str) -> dict[str, str]:
    return {"instruction": _field(record, "instruction", where),
            "input": _field(record, "input", where, required=False),
            "output": _field(record, "output", where)}


def normalize_messages(messages: Any, where: str, field: str = "messages", *,
                       need_answer: bool = True) -> list[dict[str, str]]:
    """A message list in OpenAI or ShareGPT form → [{"role", "content"}]. `need_answer=False` for a
    preference pair's prompt, which ends before the answers and so holds no assistant message to train on."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord(f"{where}: field '{field}' must be a non-empty list of messages.")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}, {field}[{i}]"
        if not isinstance(m, dict):
            raise InvalidRecord(f"{at}: a message must be an object with role and content.")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None:
            raise InvalidRecord(f"{at}: missing field 'role' (or ShareGPT 'from').")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise InvalidRecord(f"{at}: unknown role {role!r}; allowed: {', '.join(sorted(ROLE_ALIASES))}.")
        if content is None:
            raise InvalidRecord(f"{at}: missing field 'content' (or ShareGPT 'value').")
        if not isinstance(content, str):
            raise InvalidRecord(f"{at}: field 'content' must be a string, got {type(content).__name__}.")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    if need_answer and not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise InvalidRecord(f"{where}: the conversation has no non-empty assistant message to train on.")
    return out


def turns_to_messages(turns: list[str], where: str, field: str = "dialog") -> list[dict[str, str]]:
    """Alternating speakers → user/assistant; consecutive turns by one speaker are already merged upstream."""
    if not isinstance(turns, list) or len(turns) < 2:
        raise InvalidRecord(f"{where}: field '{field}' must be a list of at least two turns.")
    for i, t in enumerate(turns):
        if not isinstance(t, str):
            raise InvalidRecord(f"{where}, {field}[{i}]: a turn must be a string, got {type(t).__name__}.")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t.strip()} for i, t in enumerate(turns)]


def normalize(record: Any, fmt: str, where: str, column_mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """Raw record → one of the three normalized shapes. Raises InvalidRecord naming the field."""
    if isinstance(record, InvalidRecord):
        raise record
    if column_mapping and isinstance(record, dict):
        record = {column_mapping.get(k, k): v for k, v in record.items()}
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "text":
        if isinstance(record, str):
            return {"text": record}
        if not isinstance(record, dict):
            raise InvalidRecord(f"{where}: a text record must be a string or an object with 'text'.")
        return {"text": _field(record, "text", where)}
    if not isinstance(record, dict):
        raise InvalidRecord(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    if fmt == "alpaca":
        return normalize_alpaca(record, where)
    if fmt == "chat":
        key = "messages" if "messages" in record else "conversations" if "conversations" in record else "messages"
        if key not in record:
            raise InvalidRecord(f"{where}: missing field 'messages'.")
        messages = normalize_messages(record[key], where, key)
        return {"messages": messages}
    if fmt == "dialogue":
        key = next((k for k in ("dialog", "dialogue", "turns") if k in record), None)
        if key is None:
            raise InvalidRecord(f"{where}: missing field 'dialog' (a list of turns).")
        return {"messages": turns_to_messages(record[key], where, key)}
    if fmt == "oasst":
        raise InvalidRecord(f"{where}: OpenAssistant records are read as whole trees (read_oasst), not one by one.")
    raise DataError(f"data.format = {fmt!r} is not supported.")


# ------------------------------------------------------------------------------------------- OpenAssistant


def oasst_trees(rows: Iterable[RawRecord]) -> Iterator[RawRecord]:
    """Streaming OpenAssistant: oasst1's files hold each tree's rows together (`message_tree_id`; without
    it a root row starts a tree), so a tree's conversation is built as soon as its rows end and no more than
    one tree is held. A tree whose rows come back after another tree began cannot be streamed: a clear
    error (data.memory_map reads every row first)."""
    seen: set[str] = set()
    tree: str | None = None
    rows_of_tree: list[RawRecord] = []
    for rec in rows:
        row = rec.data
        tid = None
        if isinstance(row, dict):
            tid = row.get("message_tree_id") or (row.get("message_id") if row.get("parent_id") is None else None)
        if tid is not None and tid != tree:
            if tid in seen:
                raise DataError(f"{rec.where}: OpenAssistant tree {tid!r} goes on after other trees began; streaming "
                                "needs each tree's rows together (as oasst1's files have them). Set "
                                "data.streaming=false (data.memory_map=true reads all rows first).")
            if rows_of_tree:
                yield from oasst_conversations(rows_of_tree)[0]
            if tree is not None:
                seen.add(tree)
            tree, rows_of_tree = tid, []
        rows_of_tree.append(rec)
    if rows_of_tree:
        yield from oasst_conversations(rows_of_tree)[0]


def oasst_conversations(rows: list[RawRecord]) -> tuple[list[RawRecord], list[str]]:
    """oasst1 message rows (message_id, parent_id, role prompter|assistant, text, rank) → one conversation
    per root, following the best-ranked reply (lowest `rank`; unranked replies come after ranked ones, then
    file order) at every level, and ending on the last assistant turn. Deleted messages are not followed.

    Returns the conversations as RawRecords {"messages": [...]} (index = the root's row index) and notes
    for the log: how many rows were read and how many sit off the followed paths (not used, by design).
    Rows that are not valid messages become InvalidRecord entries so the caller counts or raises them.
    """
    children: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    roots: list[tuple[int, dict[str, Any], RawRecord]] = []
    bad: list[RawRecord] = []
    for order, rec in enumerate(rows):
        row = rec.data
        try:
            if isinstance(row, InvalidRecord):
                raise row
            if not isinstance(row, dict):
                raise InvalidRecord(f"{rec.where}: an OpenAssistant row must be an object.")
            for name in ("message_id", "role", "text"):
                if not isinstance(row.get(name), str):
                    raise InvalidRecord(f"{rec.where}: field '{name}' must be a string, got "
                                        f"{type(row.get(name)).__name__}.")
            if row["role"] not in ("prompter", "assistant"):
                raise InvalidRecord(f"{rec.where}: field 'role': unknown role {row['role']!r}; "
                                    "allowed: prompter, assistant.")
        except InvalidRecord as e:
            bad.append(RawRecord(e, rec.source, rec.index))
            continue
        if row.get("deleted"):
            continue
        if row.get("parent_id") is None:
            roots.append((order, row, rec))
        else:
            children.setdefault(row["parent_id"], []).append((order, row))

    def best(message_id: str) -> dict[str, Any] | None:
        kids = children.get(message_id, [])
        if not kids:
            return None
        rank = lambda k: (k[1].get("rank") is None, k[1].get("rank") or 0, k[0])  # noqa: E731
        return min(kids, key=rank)[1]

    out: list[RawRecord] = []
    used = unanswered = 0
    for _, root, rec in roots:
        path = [root]
        while (nxt := best(path[-1]["message_id"])) is not None:
            path.append(nxt)
        while path and path[-1]["role"] != "assistant":
            path.pop()
        if not path:
            unanswered += 1
            continue
        used += len(path)
        messages = [{"role": ROLE_ALIASES[m["role"]], "content": m["text"]} for m in path]
        out.append(RawRecord({"messages": messages}, rec.source, rec.index))
    notes = [f"OpenAssistant: {len(rows)} message rows → {len(out)} conversations along the best-ranked replies "
             f"({used} messages used; {len(rows) - used - len(bad)} on other branches, deleted or unanswered; "
             f"{unanswered} prompts without a reply)"]
    return bad + out, notes


# ------------------------------------------------------------------------------------------- raw text


def read_text_documents(path: Path) -> Iterator[RawRecord]:
    """A .txt file, line by line: documents are separated by blank lines (index = the first line's number)."""
    lines: list[str] = []
    start = 1
    for lineno, line in strict_lines(path):
        if line.endswith("\r\n"):  # lines keep their ends as written; documents use '\n' (as text mode did)
            line = line[:-2] + "\n"
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            yield RawRecord({"text": "".join(lines).rstrip("\n")}, f"{path}, line {start}", start)
            lines = []
    if lines:
        yield RawRecord({"text": "".join(lines).rstrip("\n")}, f"{path}, line {start}", start)
