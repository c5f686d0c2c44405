"""Data: source -> schema check -> tokenize -> pad / pack -> numpy batches.

`load_rows` reads a local file or a hub data set (`ptx.sources`) and
normalises each row for its kind; a bad row (a line that does not parse, a
field of the wrong shape) is a DataError that names the file, the line or
0-based row and the field, or is skipped and recorded.

The `encode_*` functions turn rows into fixed-shape numpy arrays. A sequence
`seq = [bos] + prompt_ids + completion_ids + [eos]` becomes a "sequence batch":

    inputs      [N, L] int32    seq[:-1], right-padded with pad_id
    targets     [N, L] int32    seq[1:], right-padded with pad_id
    positions   [N, L] int32    0.. within each document, 0 on padding
    segment_ids [N, L] int32    1.. = document within the row, 0 = padding
    loss_mask   [N, L] float32  1 where the target is trained on

The prompt keeps its last `max_prompt_len - 1` ids, so that `[bos] + prompt`
fits `max_prompt_len` exactly as the sampler sees it (`encode_prompts`); the
whole sequence then keeps its first `max_len + 1` ids.

`BatchIterator.batch(step)` is a pure function of the step, so a resumed run
sees the same data order as an uninterrupted one.
"""
import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from ptx.sources import BadRow, DataError, read
from ptx.tokenizer import PromptTemplate, Tokenizer

_MAX_REASONS = 10
_FIRST_REASONS = 3  # in the error when no row is usable
_ROLES = ("system", "user", "assistant")


class _BadField(Exception):
    """Raised inside row normalisation; `load_rows` adds the file and row."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


# Loading and schema checks.

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


def _sft(row: dict, columns: set, template: PromptTemplate) -> dict:
    if "messages" not in columns:
        return {"prompt": template.format_prompt(_text(row, "prompt")),
                "completion": template.format_completion(_text(row, "completion"))}
    messages = row.get("messages")
    if messages is None:
        raise _BadField("messages", "missing")
    if not isinstance(messages, list):
        raise _BadField("messages", f"expected list, got {type(messages).__name__}")
    if not messages:
        raise _BadField("messages", "empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadField(f"messages[{i}]",
                            f"expected dict, got {type(message).__name__}")
        try:
            role, _ = _text(message, "role"), _text(message, "content")
        except _BadField as e:
            raise _BadField(f"messages[{i}].{e.field}", e.problem) from None
        if role not in _ROLES:
            raise _BadField(f"messages[{i}].role", f"expected one of {_ROLES}, got {role!r}")
    if messages[-1]["role"] != "assistant":
        raise _BadField("messages", f"last message must have role 'assistant', "
                                    f"got {messages[-1]['role']!r}")
    prompt, completion = template.messages_to_pair(messages)
    return {"prompt": prompt, "completion": completion}


def _preference(row: dict, columns: set, template: PromptTemplate) -> dict:
    if "prompt" in columns:
        return {"prompt": template.format_prompt(_text(row, "prompt")),
                "chosen": template.format_completion(_text(row, "chosen")),
                "rejected": template.format_completion(_text(row, "rejected")),
                "prob_chosen": _prob(row, "prob_chosen")}
    # HH-RLHF: two whole dialogues that differ only in the last reply.
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
    return {"prompt": split["chosen"][0],
            "chosen": template.format_completion(split["chosen"][1]),
            "rejected": template.format_completion(split["rejected"][1]),
            "prob_chosen": _prob(row, "prob_chosen")}


def _prompt(row: dict, columns: set, template: PromptTemplate) -> dict:
    out = {"prompt": template.format_prompt(_text(row, "prompt"))}
    # Extra fields (answer, kind, ...) ride along for evaluation and rewards.
    out.update({k: v for k, v in row.items()
                if k != "prompt" and isinstance(v, (str, int, float))})
    return out


def _text_row(row: dict, columns: set, template: PromptTemplate) -> dict:
    return {"text": _text(row, "text")}


def _unpaired(row: dict, columns: set, template: PromptTemplate) -> dict:
    """TRL's unpaired preference rows {prompt, completion, label: bool} (text, or
    conversational: message lists), or a preference pair (`encode_unpaired` splits it)."""
    if "label" not in columns:
        return _preference(row, columns, template)
    label = row.get("label")
    if not isinstance(label, bool):
        raise _BadField("label", f"expected a bool, got {type(label).__name__}")
    if isinstance(row.get("prompt"), list):
        if not isinstance(row.get("completion"), list):
            raise _BadField("completion", "expected a list of messages, as the prompt is")
        pair = _sft({"messages": row["prompt"] + row["completion"]}, {"messages"}, template)
    else:
        pair = _sft(row, {"prompt", "completion"}, template)
    return dict(pair, label=label)


_NORMALISERS = {"sft": _sft, "preference": _preference, "prompt": _prompt,
                "text": _text_row, "unpaired": _unpaired}


def load_rows(source: str, kind: str, *, template: PromptTemplate = PromptTemplate(),
              on_bad_row: str = "error", split: str = "train") -> tuple[list[dict], dict]:
    """Reads and normalises rows of one kind.

    source: a local .json / .jsonl / .parquet / .csv file, or otherwise a
      hub data set name (loaded with `split`).
    kind: 'sft' ({prompt, completion} or {messages}), 'preference'
      ({prompt, chosen, rejected[, prob_chosen]} or HH-RLHF {chosen, rejected}
      transcripts), 'prompt' ({prompt, ...extras}), 'text' ({text}) or
      'unpaired' ({prompt, completion, label} or a preference file).
      The schema variant is chosen from the file's columns.
    on_bad_row: 'error' raises DataError at the first bad row or line; 'skip'
      drops it and records it. A problem with the whole file (missing,
      empty, another format) is a DataError either way, and so is a file
      with no usable row.

    Returns (rows, stats): rows are dicts of str (prompts formatted with
    `template`, replies with `template.format_completion`) plus
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
                rows.append(normalise(entry, columns, template))
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


# Tokenisation to fixed-shape arrays.

def _check_lens(max_len: int, max_prompt_len: int):
    if not 1 <= max_prompt_len <= max_len:
        # A larger prompt budget could leave no completion token to train on.
        raise ValueError(f"need 1 <= max_prompt_len <= max_len, got "
                         f"max_prompt_len={max_prompt_len}, max_len={max_len}")


def _keep_end(ids: list[int], n: int) -> tuple[list[int], bool]:
    return (ids[len(ids) - n:], True) if len(ids) > n else (ids, False)


def _join(tok: Tokenizer, prompt: list[int], completion: list[int],
          max_len: int) -> tuple[list[int], bool]:
    seq = [tok.bos_id] + prompt + completion + [tok.eos_id]
    return (seq[:max_len + 1], True) if len(seq) > max_len + 1 else (seq, False)


def _to_arrays(docs: Sequence[tuple[list[int], int]], max_len: int, pad_id: int,
               pack: bool) -> dict[str, np.ndarray]:
    """docs: (seq, loss_from) pairs, len(seq) <= max_len + 1, whose targets
    seq[1:] carry loss from index loss_from on. Returns a sequence batch."""
    rows: list[list[tuple[list[int], int]]] = []
    used = max_len  # forces a new row for the first document
    for seq, loss_from in docs:
        n = len(seq) - 1
        # Next-fit in input order: cheap, deterministic; rows are shuffled later.
        if not pack or used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append((seq, loss_from))
        used += n
    shape = (len(rows), max_len)
    out = {k: np.full(shape, pad_id, np.int32) for k in ("inputs", "targets")}
    out.update({k: np.zeros(shape, np.int32) for k in ("positions", "segment_ids")})
    out["loss_mask"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        start = 0
        for segment, (seq, loss_from) in enumerate(row, start=1):
            n = len(seq) - 1
            window = slice(start, start + n)
            out["inputs"][r, window] = seq[:-1]
            out["targets"][r, window] = seq[1:]
            out["positions"][r, window] = np.arange(n)
            out["segment_ids"][r, window] = segment
            out["loss_mask"][r, start + loss_from:start + n] = 1.0
            start += n
    return out


def _seq_stats(arrays: dict[str, np.ndarray], examples: int) -> dict:
    real = int((arrays["segment_ids"] > 0).sum())
    return {"examples": examples, "rows": len(arrays["inputs"]), "tokens": real,
            "loss_tokens": int(arrays["loss_mask"].sum()),
            "fill": real / max(arrays["inputs"].size, 1)}


def encode_sft(rows: Sequence[dict], tok: Tokenizer, *, max_len: int, max_prompt_len: int,
               loss_on_prompt: bool = False, pack: bool = False
               ) -> tuple[dict[str, np.ndarray], dict]:
    """SFT rows {prompt, completion} -> a sequence batch [N, max_len].

    loss_mask is 1 on targets that are completion tokens or the final eos
    (all real targets if `loss_on_prompt`). With `pack`, consecutive examples
    share a row as separate documents (segment ids 1, 2, ..., positions
    restarting at 0); each document carries its own targets, so no target
    crosses a document boundary.

    stats: examples, rows, tokens, loss_tokens, fill (real / all slots),
    truncated_prompts, truncated_sequences.
    """
    _check_lens(max_len, max_prompt_len)
    prompts = tok.encode_batch([r["prompt"] for r in rows])
    completions = tok.encode_batch([r["completion"] for r in rows])
    docs, cut_prompts, cut_seqs = [], 0, 0
    for prompt, completion in zip(prompts, completions):
        prompt, cut = _keep_end(prompt, max_prompt_len - 1)
        seq, cut_seq = _join(tok, prompt, completion, max_len)
        cut_prompts += cut
        cut_seqs += cut_seq
        # Target t predicts seq[t + 1]; the first completion token is seq[1 + len(prompt)].
        docs.append((seq, 0 if loss_on_prompt else len(prompt)))
    arrays = _to_arrays(docs, max_len, tok.pad_id, pack)
    stats = _seq_stats(arrays, len(rows))
    stats.update(truncated_prompts=cut_prompts, truncated_sequences=cut_seqs)
    return arrays, stats


def encode_text(rows: Sequence[dict], tok: Tokenizer, *, max_len: int, pack: bool = True
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Corpus rows {text} -> a sequence batch [N, max_len], loss on every token.

    A document longer than max_len is cut into consecutive windows (each
    token is a target exactly once) rather than truncated, so no text is lost.
    stats: examples, rows, tokens, loss_tokens, fill, split_documents.
    """
    docs, split_docs = [], 0
    for ids in tok.encode_batch([r["text"] for r in rows]):
        seq = [tok.bos_id] + ids + [tok.eos_id]
        # Windows overlap by one id: the last target of one is the next one's first input.
        starts = range(0, len(seq) - 1, max_len)
        split_docs += len(starts) > 1
        docs.extend((seq[s:s + max_len + 1], 0) for s in starts)
    arrays = _to_arrays(docs, max_len, tok.pad_id, pack)
    stats = _seq_stats(arrays, len(rows))
    stats["split_documents"] = split_docs
    return arrays, stats


def encode_preference(rows: Sequence[dict], tok: Tokenizer, *, max_len: int,
                      max_prompt_len: int) -> tuple[dict[str, np.ndarray], dict]:
    """Preference rows -> two aligned sequence batches and the label.

    Returns arrays 'chosen_inputs', 'chosen_targets', 'chosen_positions',
    'chosen_segment_ids', 'chosen_loss_mask' ([N, max_len]; loss on the reply
    and its eos), the same with 'rejected_', and 'prob_chosen' [N] float32.
    stats: examples, truncated_prompts (rows), truncated_sequences (chosen
    and rejected sides counted separately).
    """
    _check_lens(max_len, max_prompt_len)
    prompts = tok.encode_batch([r["prompt"] for r in rows])
    sides = {s: tok.encode_batch([r[s] for r in rows]) for s in ("chosen", "rejected")}
    kept = [_keep_end(p, max_prompt_len - 1) for p in prompts]
    cut_prompts = sum(cut for _, cut in kept)
    arrays, cut_seqs = {}, 0
    for side, completions in sides.items():
        docs = []
        for (prompt, _), completion in zip(kept, completions):
            seq, cut = _join(tok, prompt, completion, max_len)
            cut_seqs += cut
            docs.append((seq, len(prompt)))
        arrays.update({f"{side}_{k}": v for k, v in
                       _to_arrays(docs, max_len, tok.pad_id, pack=False).items()})
    arrays["prob_chosen"] = np.array([r["prob_chosen"] for r in rows], np.float32)
    return arrays, {"examples": len(rows), "truncated_prompts": cut_prompts,
                    "truncated_sequences": cut_seqs}


def encode_prompts(rows: Sequence[dict], tok: Tokenizer, *, max_prompt_len: int
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """Prompt rows -> 'prompt_tokens' [N, max_prompt_len] int32 ([bos] + the
    prompt's last max_prompt_len - 1 ids, right-padded with pad_id) and
    'prompt_lens' [N] int32. stats: examples, truncated_prompts."""
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    tokens = np.full((len(rows), max_prompt_len), tok.pad_id, np.int32)
    lens = np.zeros(len(rows), np.int32)
    cut_prompts = 0
    for i, ids in enumerate(tok.encode_batch([r["prompt"] for r in rows])):
        ids, cut = _keep_end(ids, max_prompt_len - 1)
        cut_prompts += cut
        lens[i] = len(ids) + 1
        tokens[i, :lens[i]] = [tok.bos_id] + ids
    return ({"prompt_tokens": tokens, "prompt_lens": lens},
            {"examples": len(rows), "truncated_prompts": cut_prompts})


def encode_unpaired(rows: Sequence[dict], tok: Tokenizer, *, max_len: int, max_prompt_len: int
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """Unpaired feedback rows -> prompts and completions apart, so that a step can join any
    prompt to any completion (KTO's mismatched pairs; see `steps.join_prompt_completion`).

    Returns 'prompt_tokens' / 'prompt_lens' as `encode_prompts` gives them,
    'completion' [N, max_len + 1 - max_prompt_len] int32 (the completion's ids and
    eos, cut to fit, right-padded), 'completion_lens' [N] int32 and 'label' [N]
    float32 (1 = desirable). A preference row gives two: chosen (1), rejected (0).
    stats: examples, desirable, truncated_prompts, truncated_completions.
    """
    _check_lens(max_len, max_prompt_len)
    flat = []
    for r in rows:
        flat += ([(r["prompt"], r["chosen"], 1.0), (r["prompt"], r["rejected"], 0.0)] if "chosen" in r
                 else [(r["prompt"], r["completion"], float(r["label"]))])
    arrays, stats = encode_prompts([{"prompt": p} for p, _, _ in flat], tok, max_prompt_len=max_prompt_len)
    width = max_len + 1 - max_prompt_len  # [bos] + prompt + completion + [eos] fits max_len + 1, as in SFT
    completion = np.full((len(flat), width), tok.pad_id, np.int32)
    lens = np.zeros(len(flat), np.int32)
    cut = 0
    for i, ids in enumerate(tok.encode_batch([c for _, c, _ in flat])):
        cut += len(ids) + 1 > width
        ids = (ids + [tok.eos_id])[:width]
        completion[i, :len(ids)], lens[i] = ids, len(ids)
    labels = np.array([y for _, _, y in flat], np.float32)
    arrays.update(completion=completion, completion_lens=lens, label=labels)
    return arrays, {"examples": len(flat), "desirable": int(labels.sum()),
                    "truncated_prompts": stats["truncated_prompts"], "truncated_completions": cut}


# Batches.

class BatchIterator:
    """Deterministic batches of equal-length arrays, for any step in any order.

    An epoch is a permutation of the N examples drawn from
    `np.random.default_rng([seed, epoch])`, cut into N // batch_size global
    batches (the remainder is dropped). Each process returns its contiguous
    slice of batch_size // process_count examples of the global batch.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, seed: int,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must share a non-empty leading dimension, got {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples < batch_size:
            raise ValueError(f"{self.num_examples} examples cannot fill one batch of "
                             f"batch_size={batch_size}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.arrays = arrays
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.steps_per_epoch = self.num_examples // batch_size
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        # One cached epoch: the result is still a pure function of (seed, epoch).
        if self._cached is None or self._cached[0] != epoch:
            perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                    if self.shuffle else np.arange(self.num_examples))
            self._cached = (epoch, perm)
        return self._cached[1]

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices for `step`: [local_batch_size] int64."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        perm = self._permutation(self.epoch(step))
        start = (step % self.steps_per_epoch) * self.batch_size
        start += self.process_index * self.local_batch_size
        return perm[start:start + self.local_batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{name: [local_batch_size, ...]} for `step`; the same step, the same batch."""
        idx = self.indices(step)
        return {k: v[idx] for k, v in self.arrays.items()}
