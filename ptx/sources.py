"""Sources: a local file or a hub data set -> raw rows, each bad one located.

`read` returns one entry per record of the source, in order: the row as a
dict, or a `BadRow` that says where the record is and why it could not be
parsed, so that the caller decides whether one bad line stops the run or is
skipped. A problem with the file as a whole (missing, a directory, empty,
unreadable, contents of another format) is a `DataError` at once.

Local files are parsed here rather than by `datasets`, whose errors name
neither the line nor the file and lose the whole file for one bad line:

  .jsonl    one JSON object per line (blank lines ignored)
  .json     a JSON array of objects, or JSON lines
  .csv      a header line, then one record per row; a column whose every
            non-empty cell is a number holds ints or floats, an empty cell is
            None
  .parquet  read with pyarrow

A record's row is its 0-based index among the file's records; a line is
1-based. A broken JSON array cannot be cut into records, so its syntax error
is a DataError even where bad rows are skipped.
"""
import codecs
import csv
import dataclasses
import io
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {".json": "JSON", ".jsonl": "JSON lines", ".csv": "CSV", ".parquet": "parquet"}
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# Lone surrogates are where "surrogateescape" decoding kept an invalid byte.
_ESCAPED = re.compile("[\udc80-\udcff]")


class DataError(ValueError):
    """Bad input, as one line that names the file and, where known, the line or
    row and the field: "<file>: line <n>: <problem>", "<file>: row <i>: field
    '<name>': <problem>"."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A record that cannot be used, and why.

    row: 0-based index among the file's records. line: 1-based line where
    the record starts, set for problems in the text of a JSON lines or CSV
    file (which the message then names); None for problems in the values.
    field: the column or nested field at fault, None for the whole record.
    """
    file: str
    row: int
    line: int | None
    field: str | None
    problem: str

    def location(self) -> str:
        where = f"row {self.row}" if self.line is None else f"line {self.line}"
        return where if self.field is None else f"{where}: field {self.field!r}"

    def __str__(self) -> str:
        return f"{self.file}: {self.location()}: {self.problem}"


class Record(dict):
    """A row as read, that knows where it came from: `where` is "<file>: line <n>" (JSON lines)
    or "<file>: row <i>", for errors about its values found later (a reward function's)."""

    where = ""

    @classmethod
    def at(cls, value: dict, where: str) -> "Record":
        out = cls(value)
        out.where = where
        return out


def read(source: str, split: str = "train") -> list[dict | BadRow]:
    """Entry i is row i of `source`: its dict, or a BadRow if it could not be parsed.

    source: a local file whose extension is one of FORMATS, or otherwise a hub
      data set name, loaded with `split` through `datasets`.
    """
    ext = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory, not a data file")
    if not os.path.exists(source):
        if ext in FORMATS:  # looks like a file, so a hub lookup would only obscure the typo
            raise DataError(f"{source}: no such file")
        return _hub(source, split)
    if ext not in FORMATS:
        raise DataError(f"{source}: unsupported file type {ext!r}; "
                        f"expected one of {sorted(FORMATS)}")
    data = _read_bytes(source)
    if not data:
        raise DataError(f"{source}: the file is empty")
    data = data.removeprefix(codecs.BOM_UTF8)
    if not data.strip():
        raise DataError(f"{source}: the file holds only whitespace")
    if ext == ".parquet":
        return _parquet(source, data)
    if data.startswith(b"PAR1") or b"\0" in data[:4096]:
        what = "parquet" if data.startswith(b"PAR1") else "binary"
        raise DataError(f"{source}: holds {what} data, not {FORMATS[ext]}")
    if ext == ".csv":
        return _csv(source, data)
    return _json(source, ext, data)


def _hub(name: str, split: str) -> list[dict]:
    import datasets  # here, as only hub names need it and importing it takes a second

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub and each builder raise their own kinds
        first = (str(e).strip().splitlines() or [""])[0]
        # Chained: the cause lies outside ptx, and its details may be the fix (a gated set).
        raise DataError(f"{name}: no such local file, and loading it as a hub data set "
                        f"failed: {type(e).__name__}: {first}") from e
    return ds.to_list()


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None


def _bad_utf8(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 byte 0x{e.object[e.start]:02x} at byte {e.start + 1}"


def _row(path: str, row: int, line: int | None, value) -> dict | BadRow:
    if isinstance(value, dict):
        return Record.at(value, f"{path}: line {line}" if line is not None else f"{path}: row {row}")
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    return BadRow(path, row, line, None, f"expected a JSON object, got {kind}")


def _json(path: str, ext: str, data: bytes) -> list[dict | BadRow]:
    body = data.lstrip()
    array = body[:1] == b"["
    # An array, or one object printed over lines ("{" alone on the first), is not JSON lines.
    if array or body.split(b"\n", 1)[0].strip() == b"{":
        try:
            whole = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            if ext == ".json" and array:
                line_start = data.rfind(b"\n", 0, e.start) + 1
                line = data.count(b"\n", 0, line_start) + 1
                raise DataError(f"{path}: line {line}: invalid UTF-8 byte 0x{data[e.start]:02x} "
                                f"at byte {e.start - line_start + 1}") from None
            whole = None
        except json.JSONDecodeError as e:
            if ext == ".json" and array:
                raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} "
                                f"(column {e.colno})") from None
            whole = None
        if isinstance(whole, list):
            if ext == ".jsonl":
                raise DataError(f"{path}: holds a JSON array, not JSON lines "
                                f"(one object per line); name it .json")
            return [_row(path, i, None, value) for i, value in enumerate(whole)]
        if isinstance(whole, dict):
            raise DataError(f"{path}: holds one JSON object over several lines; "
                            f"expected one object per line or an array of objects")
    entries = []
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entries.append(_row(path, len(entries), n, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError as e:
            entries.append(BadRow(path, len(entries), n, None, _bad_utf8(e)))
        except json.JSONDecodeError as e:
            entries.append(BadRow(path, len(entries), n, None,
                                  f"invalid JSON: {e.msg} (column {e.colno})"))
    return entries


def _csv(path: str, data: bytes) -> list[dict | BadRow]:
    if data.lstrip()[:1] in (b"{", b"["):
        raise DataError(f"{path}: holds JSON, not CSV; name it .json or .jsonl")
    try:
        text, escaped = data.decode("utf-8"), False
    except UnicodeDecodeError:
        # Keep the bad bytes as markers, so that each is reported with its line and field.
        text, escaped = data.decode("utf-8", "surrogateescape"), True
    # Long documents are legal cells: lift the csv module's 128 KiB default (process-wide).
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""))
    header, entries, end = None, [], 0
    for cells in reader:
        # A quoted cell may span lines: the record starts after the previous one ended.
        line, end = end + 1, reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # a blank line
        if header is None:
            if escaped and any(map(_ESCAPED.search, cells)):
                raise DataError(f"{path}: line {line}: invalid UTF-8 in the header")
            header = cells
            continue
        entries.append(_csv_record(path, len(entries), line, header, cells, escaped))
    if header is None:
        raise DataError(f"{path}: no header line")
    good = [e for e in entries if isinstance(e, list)]
    convert = [_converter([cells[j] for cells in good]) for j in range(len(header))]
    return [e if isinstance(e, BadRow) else
            {name: c(v) for name, c, v in zip(header, convert, e)} for e in entries]


def _csv_record(path: str, row: int, line: int, header: list[str], cells: list[str],
                escaped: bool) -> list[str] | BadRow:
    if len(cells) != len(header):
        return BadRow(path, row, line, None,
                      f"expected {len(header)} fields, got {len(cells)}")
    for name, cell in zip(header, cells):
        if escaped and (m := _ESCAPED.search(cell)):
            return BadRow(path, row, line, name,
                          f"invalid UTF-8 byte 0x{ord(m.group()) - 0xdc00:02x}")
    return cells


def _converter(column: list[str]):
    """Typed like pandas would: all non-empty cells ints -> int, numbers -> float."""
    filled = [v for v in column if v]
    for pattern, kind in ((_INT, int), (_FLOAT, float)):
        if filled and all(pattern.fullmatch(v) for v in filled):
            return lambda v: kind(v) if v else None
    return lambda v: v or None


def _parquet(path: str, data: bytes) -> list[dict | BadRow]:
    if not data.startswith(b"PAR1"):
        raise DataError(f"{path}: not parquet data (it lacks the leading bytes PAR1)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    columns, bad = {}, {}
    for name in table.column_names:
        try:
            columns[name] = table.column(name).to_pylist()
        except (ValueError, OverflowError):
            # Only now cell by cell, to name each bad row (invalid UTF-8, dates out of range).
            columns[name] = []
            for i, cell in enumerate(table.column(name)):
                try:
                    columns[name].append(cell.as_py())
                except (ValueError, OverflowError) as e:
                    problem = _bad_utf8(e) if isinstance(e, UnicodeDecodeError) else str(e)
                    bad.setdefault(i, BadRow(path, i, None, name, problem))
                    columns[name].append(None)
    return [bad.get(i) or {name: values[i] for name, values in columns.items()}
            for i in range(table.num_rows)]


def read_json_object(file: str) -> dict:
    """A JSON file holding one object (a model's config.json, tokenizer_config.json, ...);
    DataError naming the file when it does not parse or holds something else."""
    try:
        with open(file, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: malformed JSON: {e}") from e
    if not isinstance(out, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(out).__name__}")
    return out
