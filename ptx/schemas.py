"""Rows of each data kind, checked and normalised: TRL's standard and conversational formats.

`load_rows` reads a local file or a hub data set (`ptx.sources`) and
normalises each row for its kind; a bad row (a line that does not parse, a
field of the wrong shape) is a DataError that names the file, the line or
0-based row and the field, or is skipped and recorded.

Formats (TRL's names), per kind:

  sft         {prompt, completion} strings; {messages: [...]} (system turns,
              multi-turn); {prompt: [...], completion: [...]} message lists
  preference  {prompt, chosen, rejected} strings (optional prob_chosen);
              HH-RLHF transcripts {chosen, rejected}; {prompt: [...],
              chosen: [...], rejected: [...]}; the implicit prompt
              {chosen: [...], rejected: [...]}, whose shared first messages
              are the prompt
  prompt      {prompt} string or message list, plus extra fields
  text        {text}
  unpaired    {prompt, completion, label: bool} (KTO), strings or message
              lists; or any preference format (a pair gives two examples)

A message is {role: system | user | assistant, content: str}. With
`chat=True` (the model's tokenizer has a chat template) conversations stay
message lists for the template to render: sft rows become {messages,
train_from} (assistant messages from index train_from on are trained: every
one for {messages}, the completion's for prompt-completion), preferences
{prompt, chosen, rejected} lists, prompts {prompt: list}; string rows become
one user and one assistant message. Without, everything is rendered as text
in the configured `PromptTemplate`: sft {prompt, completion} plus `turns`,
[[text between, reply], ...] for the assistant replies after the first.
"""
import dataclasses
import json
from collections.abc import Sequence

from ptx.sources import BadRow, DataError, Record, read
from ptx.tokenizer import PromptTemplate

_MAX_REASONS = 10
_FIRST_REASONS = 3  # in the error when no row is usable
ROLES = ("system", "user", "assistant")


class _BadField(Exception):
    """Raised inside row normalisation; `load_rows` adds the file and row."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise _BadField(field, "missing")
    if not isinstance(value, str):
        raise _BadField(field, f"expected str, got {type(value).__name__}")
    if not value.strip():
        raise _BadField(field, "empty")
    return value


def _prob(row: dict, field: str) -> float:
    value = row.get(field)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadField(field, f"expected a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise _BadField(field, f"{value} outside [0, 1]")
    return float(value)


def _messages(row: dict, field: str) -> list[dict]:
    """A checked message list: [{'role', 'content'}] with known roles and non-empty content."""
    messages = row.get(field)
    if messages is None:
        raise _BadField(field, "missing")
    if not isinstance(messages, list):
        raise _BadField(field, f"expected list, got {type(messages).__name__}")
    if not messages:
        raise _BadField(field, "empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadField(f"{field}[{i}]", f"expected dict, got {type(message).__name__}")
        try:
            role, _ = _text(message, "role"), _text(message, "content")
        except _BadField as e:
            raise _BadField(f"{field}[{i}].{e.field}", e.problem) from None
        if role not in ROLES:
            raise _BadField(f"{field}[{i}].role", f"expected one of {ROLES}, got {role!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _ends_with(messages: list[dict], field: str, role: str):
    if messages[-1]["role"] != role:
        raise _BadField(field, f"last message must have role {role!r}, got {messages[-1]['role']!r}")


def _user_and_reply(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def template_turns(template: PromptTemplate, messages: Sequence[dict], train_from: int) -> list[tuple[str, bool]]:
    """Messages as (text, trained) parts in the template, consecutive parts of one kind joined.

    A system or user message is a user turn; an assistant message is the
    assistant prefix and its reply, trained from message `train_from` on.
    """
    parts = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            parts += [(template.assistant_prefix, False), (template.format_completion(m["content"]), i >= train_from)]
        else:
            parts.append((template.user_prefix + m["content"], False))
    joined = []
    for text, trained in parts:
        if joined and joined[-1][1] == trained:
            joined[-1] = (joined[-1][0] + text, trained)
        else:
            joined.append((text, trained))
    return joined


def template_prompt(template: PromptTemplate, messages: Sequence[dict]) -> str:
    """A conversation up to where the assistant starts speaking, in the template."""
    return "".join(text for text, _ in template_turns(template, messages, len(messages))) + template.assistant_prefix


def _sft(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    if "messages" in columns:
        messages, train_from = _messages(row, "messages"), 0
        _ends_with(messages, "messages", "assistant")
    elif isinstance(row.get("prompt"), list):
        prompt, completion = _messages(row, "prompt"), _messages(row, "completion")
        _ends_with(completion, "completion", "assistant")
        messages, train_from = prompt + completion, len(prompt)
    elif chat:
        messages, train_from = _user_and_reply(_text(row, "prompt"), _text(row, "completion")), 1
    else:
        return {"prompt": template.format_prompt(_text(row, "prompt")),
                "completion": template.format_completion(_text(row, "completion"))}
    if chat:
        return {"messages": messages, "train_from": train_from}
    parts = template_turns(template, messages, train_from)
    # The parts alternate untrained / trained and end trained: the conversation ends with a reply.
    out = {"prompt": parts[0][0], "completion": parts[1][0]}
    if len(parts) > 2:
        out["turns"] = [[parts[i][0], parts[i + 1][0]] for i in range(2, len(parts), 2)]
    return out


def _split_transcripts(row: dict, template: PromptTemplate) -> tuple[str, str, str]:
    """HH-RLHF: two whole dialogues that differ only in the last reply -> (prompt, chosen, rejected)."""
    marker = template.assistant_prefix
    split = {}
    for field in ("chosen", "rejected"):
        text = _text(row, field)
        cut = text.rfind(marker)
        if cut < 0:
            raise _BadField(field, f"no {marker!r} turn in the transcript")
        cut += len(marker)
        if not text[cut:].strip():
            raise _BadField(field, "empty final reply")
        split[field] = text[:cut], text[cut:]
    if split["chosen"][0] != split["rejected"][0]:
        raise _BadField("rejected", "dialogue before the last reply differs from 'chosen'")
    return split["chosen"][0], split["chosen"][1], split["rejected"][1]


def _transcript_messages(template: PromptTemplate, text: str) -> list[dict]:
    """An HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    user, assistant = template.user_prefix.rstrip(" "), template.assistant_prefix
    messages = []
    for turn in text.split(user)[1:]:
        said, _, reply = turn.partition(assistant)
        messages.append({"role": "user", "content": said.strip()})
        if reply.strip():
            messages.append({"role": "assistant", "content": reply.strip()})
    return messages


def _preference(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    return dict(_preference_sides(row, columns, template, chat), prob_chosen=_prob(row, "prob_chosen"))


def _preference_sides(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        if row.get("prompt") is not None:
            prompt = _messages(row, "prompt")
        else:  # implicit prompt: the messages both sides share
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            if k == 0 or k == len(chosen) or k == len(rejected):
                raise _BadField("rejected", "no shared prompt before differing replies in 'chosen' and 'rejected'")
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        for field, side in (("chosen", chosen), ("rejected", rejected)):
            _ends_with(side, field, "assistant")
            if not chat and len(side) != 1:
                raise _BadField(field, "the configured template takes one assistant reply (a chat template, any)")
        if chat:
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {"prompt": template_prompt(template, prompt), "chosen": template.format_completion(chosen[0]["content"]),
                "rejected": template.format_completion(rejected[0]["content"])}
    if "prompt" in columns:
        prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
        messages = [{"role": "user", "content": prompt}]
        prompt = template.format_prompt(prompt)
    else:
        prompt, chosen, rejected = _split_transcripts(row, template)
        messages = _transcript_messages(template, prompt)
    if chat:
        return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}]}
    return {"prompt": prompt, "chosen": template.format_completion(chosen),
            "rejected": template.format_completion(rejected)}


def _prompt(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    if isinstance(row.get("prompt"), list):
        messages = _messages(row, "prompt")
        if messages[-1]["role"] == "assistant":
            raise _BadField("prompt", "last message must not have role 'assistant' (the reply is to be sampled)")
        out = {"prompt": messages if chat else template_prompt(template, messages)}
    elif chat:
        out = {"prompt": [{"role": "user", "content": _text(row, "prompt")}]}
    else:
        out = {"prompt": template.format_prompt(_text(row, "prompt"))}
    # Extra fields (answer, kind, ...) ride along for evaluation and rewards.
    out.update({k: v for k, v in row.items()
                if k != "prompt" and isinstance(v, (str, int, float))})
    return out


def _text_row(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    return {"text": _text(row, "text")}


def _unpaired(row: dict, columns: set, template: PromptTemplate, chat: bool) -> dict:
    """TRL's unpaired preference rows {prompt, completion, label: bool} (text, or message
    lists), or a preference pair (`data.encode_unpaired` splits it into two examples)."""
    if "label" not in columns:
        return _preference(row, columns, template, chat)
    label = row.get("label")
    if label is None:
        raise _BadField("label", "missing; an unpaired (KTO) row needs label true (desirable) or false")
    if not isinstance(label, bool):
        raise _BadField("label", f"expected true or false, got {label!r}")
    out = _sft(row, columns - {"messages"}, template, chat)
    if "turns" in out:
        raise _BadField("completion", "one assistant reply (the completion a label judges)")
    return dict(out, label=label)


def _check_chat(row: dict, entry: dict, tok) -> None:
    """Render a chat row's conversations through `tok`'s chat template as the encoders will
    (`data.encode_*`), so that one the template refuses or whose replies cannot be located is
    this row's problem, with its field, not a failure of the whole run."""
    convo = "messages" if "messages" in entry else "completion"
    if "messages" in row:
        checks = [(convo, lambda: tok.assistant_spans(row["messages"]))]
    elif "chosen" in row:
        checks = [(side, lambda side=side: tok.assistant_spans(list(row["prompt"]) + list(row[side])))
                  for side in ("chosen", "rejected")]
    elif "completion" in row:
        checks = [(convo, lambda: tok.assistant_spans(list(row["prompt"]) + list(row["completion"])))]
    else:
        checks = [("prompt", lambda: tok.apply_chat_template(row["prompt"], add_generation_prompt=True))]
    for field, render in checks:
        try:
            render()
        except Exception as e:  # the template's own raise_exception, a jinja error, an unlocatable reply
            problem = " ".join(str(e).split())
            raise _BadField(field, f"the chat template cannot render it: {problem}") from e


_NORMALISERS = {"sft": _sft, "preference": _preference, "prompt": _prompt, "text": _text_row,
                "unpaired": _unpaired}


def load_rows(source: str, kind: str, *, template: PromptTemplate = PromptTemplate(), chat: bool = False,
              on_bad_row: str = "error", split: str = "train") -> tuple[list[dict], dict]:
    """Reads and normalises rows of one kind.

    source: a local .json / .jsonl / .parquet / .csv file, or otherwise a
      hub data set name (loaded with `split`).
    kind: 'sft', 'preference', 'prompt', 'text' or 'unpaired' (formats: the module
      docstring). The schema variant is chosen from the file's columns and
      the row's values (strings or message lists).
    chat: keep conversations as message lists for a chat template; False
      renders them in `template`. A tokenizer (`HFTokenizer`, truthy) also renders
      each conversation through its template once: a row the template cannot render
      or locate is a bad row naming its field (an error, or skipped).
    on_bad_row: 'error' raises DataError at the first bad row or line; 'skip'
      drops it and records it. A problem with the whole file (missing,
      empty, another format) is a DataError either way, and so is a file
      with no usable row.

    Returns (rows, stats): rows as the module docstring says, plus
    'prob_chosen': float for preferences; stats has 'rows' (kept),
    'skipped' (count), 'skipped_reasons' (the first 10 messages) and
    'skipped_rows' (every skipped row as {file, row, line, field, problem},
    for `write_skipped`).
    """
    if kind not in _NORMALISERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {tuple(_NORMALISERS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    entries = read(source, split)
    # The schema variant follows every column present, as a table's would.
    columns = set().union(*(e for e in entries if isinstance(e, dict)))
    normalise = _NORMALISERS[kind]
    rows, skipped = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, BadRow):
            bad = entry
        else:
            try:
                row = normalise(entry, columns, template, chat)
                if hasattr(chat, "assistant_spans") and not isinstance(row.get("prompt", row.get("text")), str):
                    _check_chat(row, entry, chat)
                # The row keeps where it came from (sources.Record), for errors found later.
                rows.append(Record.at(row, getattr(entry, "where", "") or f"{source}: row {i}"))
                continue
            except _BadField as e:
                bad = BadRow(source, i, None, e.field, e.problem)
        if on_bad_row == "error":
            raise DataError(str(bad))
        skipped.append(bad)
    if not rows:
        detail = "the file holds no rows" if not skipped else (
            f"{len(skipped)} skipped; first reasons: "
            + "; ".join(f"{b.location()}: {b.problem}" for b in skipped[:_FIRST_REASONS]))
        raise DataError(f"no usable rows in {source}: {detail}")
    return rows, {"rows": len(rows), "skipped": len(skipped),
                  "skipped_reasons": [str(b) for b in skipped[:_MAX_REASONS]],
                  "skipped_rows": [dataclasses.asdict(b) for b in skipped]}


def write_skipped(path: str, records: Sequence[dict]):
    """Writes `stats["skipped_rows"]` of `load_rows` as JSON lines, one record a line."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
