"""Tests for ptx.sources: every bad line or file is one DataError line naming the file
and where in it; a bad line is skipped without losing the rest of the file."""
import io

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptx import sources
from ptx.data import DataError, load_rows

GOOD = b'{"prompt": "a", "completion": "b"}\n'


def parquet(prompts: list[bytes], completions: list[bytes]) -> bytes:
    """Parquet bytes with string columns, the bytes unchecked (so they may be bad UTF-8)."""
    def column(values):
        return pa.array(values, pa.binary()).view(pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": column(prompts), "completion": column(completions)}), buf)
    return buf.getvalue()


def shown_alone(e: BaseException) -> bool:
    """Whether a traceback of `e` prints no other exception (the parser's own) with it."""
    return e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def put(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# (file name, contents with two good rows and one bad, message after "<file>: ",
#  the skipped row's record less its file)
BAD_LINES = {
    "truncated_json_line": (
        "t.jsonl", GOOD + b'{"prompt": "a", "compl\n' + GOOD,
        "line 2: invalid JSON: Unterminated string starting at (column 17)",
        {"row": 1, "line": 2, "field": None,
         "problem": "invalid JSON: Unterminated string starting at (column 17)"}),
    "bad_utf8_after_a_blank_line": (
        "u.jsonl", GOOD + b'\n{"prompt": "\xff", "completion": "b"}\n' + GOOD,
        "line 3: invalid UTF-8 byte 0xff at byte 13",
        {"row": 1, "line": 3, "field": None, "problem": "invalid UTF-8 byte 0xff at byte 13"}),
    "json_line_not_an_object": (
        "n.jsonl", GOOD + b"[1, 2]\n" + GOOD,
        "line 2: expected a JSON object, got array",
        {"row": 1, "line": 2, "field": None, "problem": "expected a JSON object, got array"}),
    "array_element_not_an_object": (
        "e.json", b'[{"prompt": "a", "completion": "b"}, 7, {"prompt": "c", "completion": "d"}]',
        "row 1: expected a JSON object, got number",
        {"row": 1, "line": None, "field": None, "problem": "expected a JSON object, got number"}),
    "ragged_csv_record_over_two_lines": (
        "r.csv", b'prompt,completion\na,b\n"two\nlines",c,d\ne,f\n',
        "line 3: expected 2 fields, got 3",
        {"row": 1, "line": 3, "field": None, "problem": "expected 2 fields, got 3"}),
    "bad_utf8_in_a_csv_cell": (
        "b.csv", b"prompt,completion\na,b\nc,\xff\ne,f\n",
        "line 3: field 'completion': invalid UTF-8 byte 0xff",
        {"row": 1, "line": 3, "field": "completion", "problem": "invalid UTF-8 byte 0xff"}),
    "bad_utf8_in_a_parquet_cell": (
        "b.parquet", parquet([b"a", b"c", b"e"], [b"b", b"\xff", b"f"]),
        "row 1: field 'completion': invalid UTF-8 byte 0xff at byte 1",
        {"row": 1, "line": None, "field": "completion",
         "problem": "invalid UTF-8 byte 0xff at byte 1"}),
}


@pytest.mark.parametrize("name, content, where, record", BAD_LINES.values(), ids=BAD_LINES)
def test_a_bad_line_is_one_error_line_naming_file_and_line(tmp_path, name, content, where,
                                                             record):
    src = put(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        load_rows(src, "sft")
    assert str(err.value) == f"{src}: {where}"
    assert shown_alone(err.value)


@pytest.mark.parametrize("name, content, where, record", BAD_LINES.values(), ids=BAD_LINES)
def test_skipping_a_bad_line_keeps_the_rest_of_the_file(tmp_path, name, content, where,
                                                        record):
    src = put(tmp_path, name, content)
    rows, stats = load_rows(src, "sft", on_bad_row="skip")
    assert len(rows) == stats["rows"] == 2
    assert stats["skipped"] == 1
    assert stats["skipped_reasons"] == [f"{src}: {where}"]
    assert stats["skipped_rows"] == [{"file": src, **record}]


# (file name, contents; None for a directory, "missing" for no file, message after "<file>: ")
BAD_FILES = {
    "directory": ("d.jsonl", None, "is a directory, not a data file"),
    "missing": ("nope.csv", "missing", "no such file"),
    "empty": ("e.jsonl", b"", "the file is empty"),
    "whitespace_only": ("w.jsonl", b" \n\t\r\n\n", "the file holds only whitespace"),
    "unknown_extension": ("x.txt", GOOD, "unsupported file type '.txt'; expected one of "
                                         "['.csv', '.json', '.jsonl', '.parquet']"),
    "parquet_in_jsonl": ("p.jsonl", parquet([b"a"], [b"b"]),
                         "holds parquet data, not JSON lines"),
    "gzip_in_csv": ("g.csv", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "holds binary data, not CSV"),
    "array_in_jsonl": ("a.jsonl", b'[\n  {"prompt": "a", "completion": "b"}\n]\n',
                       "holds a JSON array, not JSON lines (one object per line); "
                       "name it .json"),
    "one_line_array_in_jsonl": ("o.jsonl", b'[{"prompt": "a", "completion": "b"}]\n',
                                "holds a JSON array, not JSON lines (one object per line); "
                                "name it .json"),
    "json_in_parquet": ("j.parquet", GOOD, "not parquet data (it lacks the leading bytes PAR1)"),
    "json_in_csv": ("j.csv", GOOD, "holds JSON, not CSV; name it .json or .jsonl"),
    "one_object_over_lines": ("o.json", b'{\n  "data": [1]\n}\n',
                              "holds one JSON object over several lines; expected one "
                              "object per line or an array of objects"),
    "broken_json_array": ("b.json", b'[{"prompt": "a", "completion": "b"},\n {"prompt": }]',
                          "line 2: invalid JSON: Expecting value (column 13)"),
    "bad_utf8_in_json_array": ("u.json", b'[{"prompt": "a", "completion": "b"},\n {"p\xff": 1}]',
                               "line 2: invalid UTF-8 byte 0xff at byte 5"),
    "bad_utf8_in_csv_header": ("h.csv", b"prompt,compl\xffetion\na,b\n",
                               "line 1: invalid UTF-8 in the header"),
    "csv_of_unicode_spaces": ("s.csv", "\u00a0\n\u2003\n".encode(), "no header line"),
}


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
@pytest.mark.parametrize("name, content, message", BAD_FILES.values(), ids=BAD_FILES)
def test_a_bad_file_is_one_error_line_naming_it_in_either_mode(tmp_path, name, content,
                                                               message, on_bad_row):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_rows(str(path), "sft", on_bad_row=on_bad_row)
    assert str(err.value) == f"{path}: {message}"
    assert shown_alone(err.value)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    src = put(tmp_path, "locked.jsonl", GOOD)

    def denied(path, mode):
        raise PermissionError(13, "Permission denied", path)
    # chmod cannot lock out root, which the tests may run as.
    monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(DataError) as err:
        sources.read(src)
    assert str(err.value) == f"{src}: cannot read the file: Permission denied"


def test_csv_columns_are_typed_like_pandas_and_quoted_fields_kept(tmp_path):
    src = put(tmp_path, "p.csv", b'prompt,answer,score,note\n"Q, 1",4,0.5,\n'
                                 b'"two\nlines",-6,1,x\n')
    assert sources.read(src) == [
        {"prompt": "Q, 1", "answer": 4, "score": 0.5, "note": None},
        {"prompt": "two\nlines", "answer": -6, "score": 1.0, "note": "x"}]


def test_csv_cells_may_be_longer_than_the_csv_module_default(tmp_path):
    text = "word " * 40_000  # 200 kB; the csv module stops at 128 KiB by default
    src = put(tmp_path, "long.csv", f"text\n{text}\n".encode())
    assert sources.read(src) == [{"text": text}]


def test_a_corrupt_parquet_file_is_named(tmp_path):
    src = put(tmp_path, "c.parquet", parquet([b"a"], [b"b"])[:40])
    with pytest.raises(DataError, match=rf"^{src}: not a readable parquet file: "):
        sources.read(src)


def test_json_file_may_hold_json_lines(tmp_path):
    src = put(tmp_path, "l.json", GOOD + b'{"prompt": "c", "completion": "d"}\n')
    assert sources.read(src) == [{"prompt": "a", "completion": "b"},
                                 {"prompt": "c", "completion": "d"}]


def test_byte_order_mark_and_crlf_lines_are_read_and_lines_still_counted(tmp_path):
    src = put(tmp_path, "w.jsonl", b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n") * 2
              + b"{oops}\r\n")
    entries = sources.read(src)
    assert entries[:2] == [{"prompt": "a", "completion": "b"}] * 2
    assert str(entries[2]) == (f"{src}: line 3: invalid JSON: Expecting property name "
                               f"enclosed in double quotes (column 2)")


def test_hub_names_load_through_datasets(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(
        [{"text": f"{name}:{split}"}]))
    assert sources.read("org/set", "test") == [{"text": "org/set:test"}]


def test_a_hub_error_is_one_line_naming_the_source(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        sources.read("org/set")
    assert str(err.value) == ("org/set: no such local file, and loading it as a hub data set "
                              "failed: ConnectionError: Couldn't reach 'org/set' on the Hub")
