"""Data: source -> schema check -> tokenize -> pad / pack -> numpy batches.

`load_rows` (`ptx.schemas`) reads and normalises rows: strings in the
configured prompt template, or, for a tokenizer with a chat template,
message lists. The `encode_*` functions turn rows into fixed-shape numpy
arrays. A sequence is a list of ids with a per-id trained flag:

- template rows: `[bos] + prompt + completion (+ turns) + [eos]`, each part
  encoded on its own (so the prompt / completion boundary is a token
  boundary), trained on the replies and the eos; no bos when the tokenizer
  has none (Qwen);
- chat rows: the chat template's ids (`HFTokenizer.assistant_spans`), which
  hold bos and stop tokens themselves, trained on each assistant turn's
  span: what the model generates from the generation prompt up to its stop
  token, inclusive.

A sequence becomes a "sequence batch":

    inputs      [N, L] int32    seq[:-1], right-padded with pad_id
    targets     [N, L] int32    seq[1:], right-padded with pad_id
    positions   [N, L] int32    0.. within each document, 0 on padding
    segment_ids [N, L] int32    1.. = document within the row, 0 = padding
    loss_mask   [N, L] float32  1 where the target is trained on

The prompt (what precedes the first trained id) keeps its last ids, so that
it fits `max_prompt_len` exactly as the sampler sees it (`encode_prompts`);
the whole sequence then keeps its first `max_len + 1` ids.

`BatchIterator.batch(step)` is a pure function of the step, so a resumed run
sees the same data order as an uninterrupted one.
"""
import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging

from ptx import fields
from ptx.schemas import load_rows, write_skipped
from ptx.sources import DataError
from ptx.tokenizer import HFTokenizer, Tokenizer

__all__ = ["DataConfig", "KINDS", "load_rows", "write_skipped", "DataError", "encode_sft", "encode_text",
           "encode_preference", "encode_unpaired", "pair_arrays", "encode_prompts", "prompt_text", "BatchIterator"]


KINDS = ("sft", "text", "preference", "prompt", "unpaired")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section: what a stage reads and how rows become arrays."""

    train: str = ""  # local json / jsonl / parquet / csv file, or a hub data set name; '' = the embedded world's
    eval: str = ""  # held-out file of the same kind; '' = no eval
    kind: str = "sft"  # sft | text | preference | prompt | unpaired
    max_len: int = 128  # tokens per training row (after the shift)
    max_prompt_len: int = 96  # prompts keep their last tokens
    pack: bool = False  # pack several documents into one row (segment ids keep them apart)
    loss_on_prompt: bool = False  # SFT loss on response tokens only
    on_bad_row: str = "error"  # error | skip (skipped rows are counted in the log and listed in the workdir)

    def __post_init__(self):
        fields.check(self, "data", kind=fields.one_of(*KINDS), max_len=fields.POSITIVE,
                     max_prompt_len=fields.POSITIVE, pack=fields.BOOL, loss_on_prompt=fields.BOOL,
                     on_bad_row=fields.one_of("error", "skip"))


def _check_lens(max_len: int, max_prompt_len: int):
    if not 1 <= max_prompt_len <= max_len:
        # A larger prompt budget could leave no completion token to train on.
        raise ValueError(f"need 1 <= max_prompt_len <= max_len, got "
                         f"max_prompt_len={max_prompt_len}, max_len={max_len}")


def _bos(tok) -> list[int]:
    return [tok.bos_id] if tok.bos_id >= 0 else []


def _chat_ids(tok: HFTokenizer, messages: list[dict], train_from: int) -> tuple[list[int], list[int]]:
    """(ids, trained flags) of a conversation in the chat template: the spans of its assistant
    messages from index `train_from` on."""
    ids, spans = tok.assistant_spans(messages)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = [0] * len(ids)
    for index, (start, end) in zip(assistants, spans):
        if index >= train_from:
            trained[start:end] = [1] * (end - start)
    return ids, trained


def _document(head: list[int], prompt: list[int], rest: list[int], trained: list[int], *, max_len: int,
              max_prompt_len: int, all_tokens: bool) -> tuple[tuple[list[int], list[int]], bool, bool]:
    """((seq, trained flags), prompt cut, sequence cut) of head + prompt + rest: head and the prompt's
    last ids fill at most max_prompt_len, the whole is cut to max_len + 1 ids. all_tokens: every id
    is trained."""
    budget = max_prompt_len - len(head)
    cut_prompt = len(prompt) > budget
    prompt = prompt[len(prompt) - budget:] if cut_prompt else prompt
    seq = head + prompt + rest
    flags = [1] * len(seq) if all_tokens else [0] * (len(head) + len(prompt)) + trained
    return (seq[:max_len + 1], flags[:max_len + 1]), cut_prompt, len(seq) > max_len + 1


def _documents(tok, parts: list, *, max_len: int, max_prompt_len: int, all_tokens: bool):
    """(docs, prompts cut, sequences cut) of examples given as `parts`: for a template row (prompt
    text, [(text, trained), ...]), encoded part by part between bos and eos (trained); for a chat
    row (messages, train_from), the chat template's ids and spans."""
    texts = [t for p in parts if not isinstance(p[0], list) for t in [p[0]] + [text for text, _ in p[1]]]
    encoded = iter(tok.encode_batch(texts) if texts else [])
    docs, cut_prompts, cut_seqs = [], 0, 0
    for i, p in enumerate(parts):
        if isinstance(p[0], list):
            try:
                ids, trained = _chat_ids(tok, *p)
            except ValueError as e:  # a template that raises, or turns that cannot be located
                raise ValueError(f"example {i}: {e}") from e
            first = trained.index(1) if 1 in trained else len(ids)
            head, prompt, rest, trained = [], ids[:first], ids[first:], trained[first:]
        else:
            head, prompt, rest, trained = _bos(tok), next(encoded), [], []
            for _, flag in p[1]:
                ids = next(encoded)
                rest, trained = rest + ids, trained + [int(flag)] * len(ids)
            rest, trained = rest + [tok.eos_id], trained + [1]
        doc, cut_prompt, cut_seq = _document(head, prompt, rest, trained, max_len=max_len,
                                             max_prompt_len=max_prompt_len, all_tokens=all_tokens)
        docs.append(doc)
        cut_prompts += cut_prompt
        cut_seqs += cut_seq
    return docs, cut_prompts, cut_seqs


def _to_arrays(docs: Sequence[tuple[list[int], list[int]]], max_len: int, pad_id: int,
               pack: bool) -> dict[str, np.ndarray]:
    """docs: (seq, trained) pairs, len(seq) <= max_len + 1; target t (seq[t + 1]) carries loss
    where trained[t + 1]. Returns a sequence batch."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = max_len  # forces a new row for the first document
    for seq, trained in docs:
        n = len(seq) - 1
        # Next-fit in input order: cheap, deterministic; rows are shuffled later.
        if not pack or used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append((seq, trained))
        used += n
    shape = (len(rows), max_len)
    out = {k: np.full(shape, pad_id, np.int32) for k in ("inputs", "targets")}
    out.update({k: np.zeros(shape, np.int32) for k in ("positions", "segment_ids")})
    out["loss_mask"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        start = 0
        for segment, (seq, trained) in enumerate(row, start=1):
            n = len(seq) - 1
            window = slice(start, start + n)
            out["inputs"][r, window] = seq[:-1]
            out["targets"][r, window] = seq[1:]
            out["positions"][r, window] = np.arange(n)
            out["segment_ids"][r, window] = segment
            out["loss_mask"][r, window] = trained[1:]
            start += n
    return out


def _seq_stats(arrays: dict[str, np.ndarray], examples: int) -> dict:
    real = int((arrays["segment_ids"] > 0).sum())
    return {"examples": examples, "rows": len(arrays["inputs"]), "tokens": real,
            "loss_tokens": int(arrays["loss_mask"].sum()),
            "fill": real / max(arrays["inputs"].size, 1)}


def _sft_parts(row: dict):
    if "messages" in row:
        return row["messages"], row["train_from"]
    return row["prompt"], [(row["completion"], True)] + [
        part for between, reply in row.get("turns", ()) for part in ((between, False), (reply, True))]


def encode_sft(rows: Sequence[dict], tok: Tokenizer | HFTokenizer, *, max_len: int, max_prompt_len: int,
               loss_on_prompt: bool = False, pack: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """SFT rows (`load_rows`) -> a sequence batch [N, max_len].

    loss_mask is 1 on targets that are reply tokens: template rows' completion,
    later turns' replies and the final eos; chat rows' assistant spans (every
    assistant turn, or a prompt-completion row's completion). With
    `loss_on_prompt`, on every real target. With `pack`, consecutive examples
    share a row as separate documents (segment ids 1, 2, ..., positions
    restarting at 0); each document carries its own targets, so no target
    crosses a document boundary.

    stats: examples, rows, tokens, loss_tokens, fill (real / all slots),
    truncated_prompts, truncated_sequences.
    """
    _check_lens(max_len, max_prompt_len)
    docs, cut_prompts, cut_seqs = _documents(tok, [_sft_parts(r) for r in rows], max_len=max_len,
                                             max_prompt_len=max_prompt_len, all_tokens=loss_on_prompt)
    arrays = _to_arrays(docs, max_len, tok.pad_id, pack)
    stats = _seq_stats(arrays, len(rows))
    stats.update(truncated_prompts=cut_prompts, truncated_sequences=cut_seqs)
    return arrays, stats


def encode_text(rows: Sequence[dict], tok: Tokenizer | HFTokenizer, *, max_len: int, pack: bool = True
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Corpus rows {text} -> a sequence batch [N, max_len], loss on every token.

    A document longer than max_len is cut into consecutive windows (each
    token is a target exactly once) rather than truncated, so no text is lost.
    stats: examples, rows, tokens, loss_tokens, fill, split_documents.
    """
    docs, split_docs = [], 0
    for ids in tok.encode_batch([r["text"] for r in rows]):
        seq = _bos(tok) + ids + [tok.eos_id]
        # Windows overlap by one id: the last target of one is the next one's first input.
        starts = range(0, len(seq) - 1, max_len)
        split_docs += len(starts) > 1
        docs.extend((seq[s:s + max_len + 1], [1] * len(seq[s:s + max_len + 1])) for s in starts)
    arrays = _to_arrays(docs, max_len, tok.pad_id, pack)
    stats = _seq_stats(arrays, len(rows))
    stats["split_documents"] = split_docs
    return arrays, stats


def encode_preference(rows: Sequence[dict], tok: Tokenizer | HFTokenizer, *, max_len: int,
                      max_prompt_len: int, shared_prefix: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Preference rows -> two aligned sequence batches and the label.

    Returns arrays 'chosen_inputs', 'chosen_targets', 'chosen_positions',
    'chosen_segment_ids', 'chosen_loss_mask' ([N, max_len]; loss on the reply
    and its eos, or a chat row's assistant spans after the prompt), the same
    with 'rejected_', and 'prob_chosen' [N] float32. shared_prefix: the same
    sequences, cut the same way, as one row per pair (`pair_arrays`). stats:
    examples, truncated_prompts (rows), truncated_sequences (chosen and
    rejected sides counted separately).
    """
    _check_lens(max_len, max_prompt_len)
    sides, cut_prompts, cut_seqs = [], 0, 0
    for side in ("chosen", "rejected"):
        parts = [(r["prompt"] + r[side], len(r["prompt"])) if isinstance(r["prompt"], list)
                 else (r["prompt"], [(r[side], True)]) for r in rows]
        docs, cut_p, cut_s = _documents(tok, parts, max_len=max_len, max_prompt_len=max_prompt_len,
                                        all_tokens=False)
        cut_prompts, cut_seqs = cut_p if side == "chosen" else cut_prompts, cut_seqs + cut_s
        sides.append(docs)
    arrays = pair_arrays(*sides, max_len=max_len, pad_id=tok.pad_id, shared_prefix=shared_prefix)
    arrays["prob_chosen"] = np.array([r["prob_chosen"] for r in rows], np.float32)
    return arrays, {"examples": len(rows), "truncated_prompts": cut_prompts, "truncated_sequences": cut_seqs}


def pair_arrays(chosen: Sequence[tuple[list[int], list[int]]], rejected: Sequence[tuple[list[int], list[int]]],
                *, max_len: int, pad_id: int, shared_prefix: bool = False) -> dict[str, np.ndarray]:
    """(seq, trained flags) of each pair's sides, at most max_len + 1 ids each -> two aligned
    sequence batches ('chosen_inputs', ..., 'rejected_loss_mask'), or with shared_prefix one
    row per pair (`_shared_rows`). Inputs, positions and segment ids are [N, max_len];
    targets and loss masks [N, max_len - s], the last columns: the s before are prompt
    in every row of both sides, and the LM head never reads them (`logprobs.pair_logps`)."""
    if shared_prefix:
        return _shared_rows(chosen, rejected, pad_id)
    out = {f"{side}_{k}": v for side, docs in (("chosen", chosen), ("rejected", rejected))
           for k, v in _to_arrays(docs, max_len, pad_id, pack=False).items()}
    trained = out["chosen_loss_mask"].any(axis=0) | out["rejected_loss_mask"].any(axis=0)
    s = int(np.argmax(trained)) if trained.any() else 0
    for key in ("chosen_targets", "chosen_loss_mask", "rejected_targets", "rejected_loss_mask"):
        out[key] = out[key][:, s:]
    return out


def _shared_rows(chosen: Sequence[tuple[list[int], list[int]]], rejected: Sequence[tuple[list[int], list[int]]],
                 pad_id: int) -> dict[str, np.ndarray]:
    """One row per pair, [prefix | chosen | rejected], the prefix ending at one column for all rows.

    The prefix is the untrained ids both sequences start with, less the last:
    each branch starts with that id (its input predicts the branch's first
    target), so the prefix's columns need no LM head. A branch's positions
    continue the prefix's, as in its own row; branch ids are 0 on the prefix,
    1 on chosen, 2 on rejected (`ptx.attention`). Returns inputs, positions,
    segment_ids (1 on real tokens), branch_ids [N, P + R] int32, each prefix
    right-aligned in the first P columns (left-padded) and the responses from
    column P on; targets [N, R] int32 and chosen_loss_mask, rejected_loss_mask
    [N, R] float32 of those last R columns. P: the longest prefix, R: the
    longest pair of responses.
    """
    rows = []
    for (c, c_trained), (r, r_trained) in zip(chosen, rejected):
        n = 0  # common untrained ids, leaving each side at least one target
        while (n < min(len(c), len(r)) - 1 and c[n] == r[n] and not c_trained[n] and not r_trained[n]):
            n += 1
        rows.append((max(n - 1, 0), c, c_trained, r, r_trained))
    prefix = max(s for s, *_ in rows)
    width = max(len(c) + len(r) - 2 - 2 * s for s, c, _, r, _ in rows)
    shape, n_rows = (len(rows), prefix + width), len(rows)
    out = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.full((n_rows, width), pad_id, np.int32)}
    out.update({k: np.zeros(shape, np.int32) for k in ("positions", "segment_ids", "branch_ids")})
    out.update({k: np.zeros((n_rows, width), np.float32) for k in ("chosen_loss_mask", "rejected_loss_mask")})
    for i, (s, c, c_trained, r, r_trained) in enumerate(rows):
        out["inputs"][i, prefix - s:prefix], out["positions"][i, prefix - s:prefix] = c[:s], np.arange(s)
        start = 0  # in the response columns
        for branch, (seq, trained) in enumerate(((c, c_trained), (r, r_trained)), start=1):
            cols = slice(start, start + len(seq) - 1 - s)
            row_cols = slice(prefix + cols.start, prefix + cols.stop)
            out["inputs"][i, row_cols], out["targets"][i, cols] = seq[s:-1], seq[s + 1:]
            out["positions"][i, row_cols], out["branch_ids"][i, row_cols] = np.arange(s, len(seq) - 1), branch
            out[("chosen", "rejected")[branch - 1] + "_loss_mask"][i, cols] = trained[s + 1:]
            start = cols.stop
        out["segment_ids"][i, prefix - s:prefix + start] = 1
    return out


def prompt_text(row: dict, tok) -> str:
    """A prompt row's prompt as text: the template's string, or the chat template's rendering
    with the generation prompt."""
    return row["prompt"] if isinstance(row["prompt"], str) else tok.render_chat(row["prompt"], True)


def encode_prompts(rows: Sequence[dict], tok: Tokenizer | HFTokenizer, *, max_prompt_len: int
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """Prompt rows -> 'prompt_tokens' [N, max_prompt_len] int32 (a template prompt's
    [bos] + ids, or a chat prompt's template ids with the generation prompt, keeping
    the last max_prompt_len; right-padded with pad_id) and 'prompt_lens' [N] int32.
    stats: examples, truncated_prompts."""
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    tokens = np.full((len(rows), max_prompt_len), tok.pad_id, np.int32)
    lens = np.zeros(len(rows), np.int32)
    cut_prompts = 0
    texts = iter(tok.encode_batch([r["prompt"] for r in rows if isinstance(r["prompt"], str)]))
    for i, row in enumerate(rows):
        if isinstance(row["prompt"], str):
            head, ids = _bos(tok), next(texts)
        else:
            head, ids = [], tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
        budget = max_prompt_len - len(head)
        cut = len(ids) > budget
        ids = head + (ids[len(ids) - budget:] if cut else ids)
        cut_prompts += cut
        lens[i] = len(ids)
        tokens[i, :lens[i]] = ids
    if cut_prompts:
        logging.warning("%d of %d prompts are longer than data.max_prompt_len=%d tokens: each is cut to its "
                        "last %d tokens", cut_prompts, len(rows), max_prompt_len, max_prompt_len)
    return ({"prompt_tokens": tokens, "prompt_lens": lens},
            {"examples": len(rows), "truncated_prompts": cut_prompts})


def _prompt_and_completion(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids with its end) of one unpaired example: template strings as
    [bos] + ids and ids + [eos]; message lists through the chat template, the completion being
    the last assistant span of the rendered conversation (its stop token included)."""
    if isinstance(prompt, str):
        return _bos(tok) + tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
    ids, spans = tok.assistant_spans(list(prompt) + list(completion))
    start, end = spans[-1]
    return ids[:start], ids[start:end]


def encode_unpaired(rows: Sequence[dict], tok: Tokenizer | HFTokenizer, *, max_len: int, max_prompt_len: int
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """Unpaired feedback rows -> prompts and completions apart, so that a step can join any
    prompt to any completion (KTO's mismatched pairs; see `logprobs.join_prompt_completion`).

    rows: `load_rows(kind='unpaired')`: {prompt, completion, label} (template strings, or a
    chat's {messages, train_from, label}) or preference rows, each giving two examples:
    chosen (1) and rejected (0). Returns 'prompt_tokens' [N, max_prompt_len] int32 (keeping
    the last tokens) / 'prompt_lens' [N] int32 as `encode_prompts` gives them, 'completion'
    [N, max_len + 1 - max_prompt_len] int32 (the completion's ids and its end, cut to fit,
    right-padded), 'completion_lens' [N] int32 and 'label' [N] float32 (1 = desirable).
    stats: examples, desirable, truncated_prompts, truncated_completions.
    """
    _check_lens(max_len, max_prompt_len)
    flat = []
    for r in rows:
        if "chosen" in r:
            flat += [(r["prompt"], r["chosen"], 1.0), (r["prompt"], r["rejected"], 0.0)]
        elif "messages" in r:
            flat.append((r["messages"][:r["train_from"]], r["messages"][r["train_from"]:], float(r["label"])))
        else:
            flat.append((r["prompt"], r["completion"], float(r["label"])))
    width = max_len + 1 - max_prompt_len  # [bos] + prompt + completion + [eos] fits max_len + 1, as in SFT
    prompts = np.full((len(flat), max_prompt_len), tok.pad_id, np.int32)
    completion = np.full((len(flat), width), tok.pad_id, np.int32)
    prompt_lens, lens = np.zeros(len(flat), np.int32), np.zeros(len(flat), np.int32)
    cut_prompts = cut = 0
    for i, (p, c, _) in enumerate(flat):
        p_ids, c_ids = _prompt_and_completion(tok, p, c)
        cut_prompts += len(p_ids) > max_prompt_len
        cut += len(c_ids) > width
        p_ids, c_ids = p_ids[-max_prompt_len:], c_ids[:width]
        prompts[i, :len(p_ids)], prompt_lens[i] = p_ids, len(p_ids)
        completion[i, :len(c_ids)], lens[i] = c_ids, len(c_ids)
    labels = np.array([y for _, _, y in flat], np.float32)
    return ({"prompt_tokens": prompts, "prompt_lens": prompt_lens, "completion": completion,
             "completion_lens": lens, "label": labels},
            {"examples": len(flat), "desirable": int(labels.sum()), "truncated_prompts": cut_prompts,
             "truncated_completions": cut})


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
