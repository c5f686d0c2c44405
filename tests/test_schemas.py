"""ptx.schemas (through ptx.data.load_rows): rows of each kind in every file format, and errors naming
file, row and field."""
import json

import pandas as pd
import pytest

from ptx import data
from ptx.data import DataError, load_rows
from ptx.tokenizer import PromptTemplate

from conftest import write_jsonl

T = PromptTemplate()


def write(path, rows) -> str:
    """Writes rows in the format named by the path's extension."""
    ext = path.suffix
    if ext == ".jsonl":
        return write_jsonl(path, rows)
    if ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif ext == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


SFT_ROWS = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(4)]


# --------------------------------------------------------------------------- #
# Schemas.
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_sft_prompt_completion_rows_are_formatted_in_every_format(tmp_path, ext):
    rows, stats = load_rows(write(tmp_path / f"sft{ext}", SFT_ROWS), "sft")
    assert rows == [{"prompt": T.format_prompt(f"Q{i}?"), "completion": f" A{i}."}
                    for i in range(4)]
    assert stats == {"rows": 4, "skipped": 0, "skipped_reasons": [], "skipped_rows": []}


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_sft_messages_become_prompt_reply_and_later_turns(tmp_path, ext):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    rows, _ = load_rows(write(tmp_path / f"m{ext}", [{"messages": messages}]), "sft")
    # Every assistant turn is trained: the first reply, then [text between, reply] per later one.
    assert rows == [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "completion": " Hello",
                     "turns": [["\n\nHuman: Bye\n\nAssistant:", " Ciao"]]}]


def test_preference_rows_with_optional_prob_chosen(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "prob_chosen": 0.75},
        {"prompt": "R", "chosen": "yes", "rejected": "no"},
    ])
    rows, _ = load_rows(src, "preference")
    assert rows == [
        {"prompt": T.format_prompt("Q"), "chosen": " good", "rejected": " bad",
         "prob_chosen": 0.75},
        {"prompt": T.format_prompt("R"), "chosen": " yes", "rejected": " no",
         "prob_chosen": 1.0},
    ]


def test_preference_parquet_loads(tmp_path):
    src = write(tmp_path / "p.parquet",
                [{"prompt": "Q", "chosen": "good", "rejected": "bad", "prob_chosen": 0.0}])
    rows, _ = load_rows(src, "preference")
    assert rows[0]["prob_chosen"] == 0.0 and rows[0]["rejected"] == " bad"


def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    history = "\n\nHuman: Hi\n\nAssistant: Hello there.\n\nHuman: Tell me a joke."
    src = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": history + "\n\nAssistant: Why did the chicken cross the road?",
        "rejected": history + "\n\nAssistant: No.",
    }])
    rows, _ = load_rows(src, "preference")
    assert rows == [{"prompt": history + "\n\nAssistant:",
                     "chosen": " Why did the chicken cross the road?",
                     "rejected": " No.", "prob_chosen": 1.0}]


def test_hh_transcripts_with_different_prefixes_error_on_that_row(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    ])
    with pytest.raises(DataError, match=rf"^{src}: row 1: field 'rejected': dialogue before"):
        load_rows(src, "preference")


def test_prompt_rows_keep_extra_string_and_number_fields(tmp_path):
    src = write(tmp_path / "p.csv", [{"prompt": "2+2?", "answer": 4, "kind": "add"},
                                     {"prompt": "3+3?", "answer": 6, "kind": "add"}])
    rows, _ = load_rows(src, "prompt")
    assert rows == [{"prompt": T.format_prompt("2+2?"), "answer": 4, "kind": "add"},
                    {"prompt": T.format_prompt("3+3?"), "answer": 6, "kind": "add"}]


def test_text_rows_are_not_templated(tmp_path):
    rows, _ = load_rows(write_jsonl(tmp_path / "t.jsonl", [{"text": "  raw\ntext "}]), "text")
    assert rows == [{"text": "  raw\ntext "}]


# --------------------------------------------------------------------------- #
# Errors name file, row and field.
# --------------------------------------------------------------------------- #

BAD_SFT = [
    {"prompt": "ok", "completion": "ok"},
    {"prompt": "ok", "completion": ""},       # row 1: empty
    {"prompt": "ok", "completion": "ok"},
    {"prompt": "ok"},                          # row 3: missing
    {"prompt": 7, "completion": "ok"},         # row 4: mistyped
    {"prompt": "ok", "completion": None},      # row 5: missing (null)
    {"prompt": "ok", "completion": "   "},     # row 6: whitespace only
]


@pytest.mark.parametrize("row, field, problem", [
    (1, "completion", "empty"),
    (3, "completion", "missing"),
    (4, "prompt", "expected str, got int"),
    (5, "completion", "missing"),
    (6, "completion", "empty"),
])
def test_bad_field_error_names_file_row_and_field(tmp_path, row, field, problem):
    # Every other bad row is replaced by a good one, so the first error is this row.
    rows = [r if i in (0, 2, row) else {"prompt": "ok", "completion": "ok"}
            for i, r in enumerate(BAD_SFT)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(src, "sft")
    assert str(err.value) == f"{src}: row {row}: field '{field}': {problem}"


@pytest.mark.parametrize("value, problem", [
    (1.5, "1.5 outside [0, 1]"),
    (-0.1, "-0.1 outside [0, 1]"),
    ("high", "expected a number, got str"),
])
def test_prob_chosen_out_of_range_or_not_a_number_errors(tmp_path, value, problem):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "a", "rejected": "b", "prob_chosen": 0.5},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "prob_chosen": value},
    ])
    with pytest.raises(DataError) as err:
        load_rows(src, "preference")
    assert str(err.value) == f"{src}: row 1: field 'prob_chosen': {problem}"


@pytest.mark.parametrize("messages, field, problem", [
    ([{"role": "user", "content": "hi"}], "messages", "last message must have role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
     "messages[1].content", "empty"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
     "messages[0].role", "expected one of"),
    ([], "messages", "empty"),
])
def test_bad_messages_error_names_the_message_field(tmp_path, messages, field, problem):
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    src = write_jsonl(tmp_path / "m.jsonl", [{"messages": good}, {"messages": messages}])
    with pytest.raises(DataError) as err:
        load_rows(src, "sft")
    assert str(err.value).startswith(f"{src}: row 1: field '{field}': {problem}")


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", BAD_SFT)
    rows, stats = load_rows(src, "sft", on_bad_row="skip")
    assert len(rows) == stats["rows"] == 2
    assert stats["skipped"] == 5
    assert [m.split(": field")[0] for m in stats["skipped_reasons"]] == [
        f"{src}: row {i}" for i in (1, 3, 4, 5, 6)]
    assert stats["skipped_rows"][:2] == [
        {"file": src, "row": 1, "line": None, "field": "completion", "problem": "empty"},
        {"file": src, "row": 3, "line": None, "field": "completion", "problem": "missing"}]


def test_skip_reasons_keep_only_the_first_ten_but_every_row_is_recorded(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}] * 12 + [{"text": "ok"}])
    rows, stats = load_rows(src, "text", on_bad_row="skip")
    assert (stats["rows"], stats["skipped"], len(stats["skipped_reasons"])) == (1, 12, 10)
    assert [r["row"] for r in stats["skipped_rows"]] == list(range(12))


def test_skipped_rows_are_written_as_json_lines(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": "ok"}, {"txt": "x"}])
    _, stats = load_rows(src, "text", on_bad_row="skip")
    out = tmp_path / "skipped_rows.jsonl"
    data.write_skipped(str(out), stats["skipped_rows"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"file": src, "row": 0, "line": None, "field": "text", "problem": "empty"},
        {"file": src, "row": 2, "line": None, "field": "text", "problem": "missing"}]


def test_no_usable_row_is_its_own_error_with_the_first_reasons(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": ""}\n{"text": \n{"txt": "x"}\n{"text": 7}\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path), "text", on_bad_row="skip")
    assert str(err.value) == (
        f"no usable rows in {path}: 4 skipped; first reasons: row 0: field 'text': empty; "
        f"line 2: invalid JSON: Expecting value (column 10); row 2: field 'text': missing")


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_file_without_rows_is_an_error(tmp_path, on_bad_row):
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("prompt,completion\n")
    for src in (str(header_only), write(tmp_path / "none.json", [])):
        with pytest.raises(DataError) as err:
            load_rows(src, "sft", on_bad_row=on_bad_row)
        assert str(err.value) == f"no usable rows in {src}: the file holds no rows"


def test_missing_local_file_and_unknown_kind_are_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as err:
        load_rows(missing, "sft")
    assert str(err.value) == f"{missing}: no such file"
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="'chat'"):
        load_rows(src, "chat")


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(data.DataError, match="empty.jsonl: the file is empty"):
        data.load_rows(str(path), "preference")
