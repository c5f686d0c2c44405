"""Tests for ptx.data: tokenised layouts, packing, batches (row schemas: test_schemas.py)."""
import numpy as np
import pytest

from ptx import data
from ptx.data import BatchIterator, DataError, encode_preference, encode_prompts, encode_sft, encode_text, load_rows
from ptx.tokenizer import PromptTemplate, train_tokenizer

from conftest import write_jsonl

T = PromptTemplate()
SEQ_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [T.format_prompt(f"Question {i}: what is {i} times two?")
             + T.format_completion(f"The answer is {2 * i}, of course.") for i in range(200)]
    texts += ["Some plain corpus text, with words and more words.\n"] * 20
    return train_tokenizer(texts, vocab_size=400,
                           path=str(tmp_path_factory.mktemp("tok") / "t.model"))


# --------------------------------------------------------------------------- #
# Tokenised layouts.
# --------------------------------------------------------------------------- #

def sft_rows(n):
    return [{"prompt": T.format_prompt(f"Question {i}: what is {i} times two?" + " more" * i),
             "completion": T.format_completion(f"The answer is {2 * i}.")} for i in range(n)]


def real_doc(arrays, r, segment=1):
    """The (inputs, targets, loss_mask) of one document of row r."""
    sel = arrays["segment_ids"][r] == segment
    return arrays["inputs"][r][sel], arrays["targets"][r][sel], arrays["loss_mask"][r][sel]


def test_sft_arrays_hold_shifted_sequence_and_padding(tok):
    rows = sft_rows(3)
    arrays, stats = encode_sft(rows, tok, max_len=64, max_prompt_len=40)
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        k: ((3, 64), np.float32 if k == "loss_mask" else np.int32) for k in SEQ_KEYS}
    for r, row in enumerate(rows):
        seq = [tok.bos_id] + tok.encode(row["prompt"]) + tok.encode(row["completion"]) \
            + [tok.eos_id]
        n = len(seq) - 1
        np.testing.assert_array_equal(arrays["inputs"][r, :n], seq[:-1])
        np.testing.assert_array_equal(arrays["targets"][r, :n], seq[1:])
        np.testing.assert_array_equal(arrays["positions"][r, :n], np.arange(n))
        np.testing.assert_array_equal(arrays["segment_ids"][r], [1] * n + [0] * (64 - n))
        assert (arrays["inputs"][r, n:] == tok.pad_id).all()
        assert (arrays["targets"][r, n:] == tok.pad_id).all()
        assert (arrays["loss_mask"][r, n:] == 0).all()
    assert stats["truncated_prompts"] == stats["truncated_sequences"] == 0


def test_loss_mask_covers_exactly_completion_tokens_and_eos(tok):
    rows = sft_rows(4)
    arrays, stats = encode_sft(rows, tok, max_len=64, max_prompt_len=40)
    for r, row in enumerate(rows):
        completion = tok.encode(row["completion"])
        _, targets, mask = real_doc(arrays, r)
        np.testing.assert_array_equal(targets[mask == 1], completion + [tok.eos_id])
        # Masked targets form one block at the end of the document.
        assert mask.tolist() == [0] * (len(mask) - len(completion) - 1) \
            + [1] * (len(completion) + 1)
    assert stats["loss_tokens"] == arrays["loss_mask"].sum()


def test_loss_on_prompt_trains_on_every_real_target(tok):
    arrays, _ = encode_sft(sft_rows(4), tok, max_len=64, max_prompt_len=40,
                           loss_on_prompt=True)
    np.testing.assert_array_equal(arrays["loss_mask"], arrays["segment_ids"] > 0)


def test_long_prompt_is_left_truncated_and_counted(tok):
    row = sft_rows(20)[-1]  # its prompt has many " more" tokens
    prompt = tok.encode(row["prompt"])
    completion = tok.encode(row["completion"])
    arrays, stats = encode_sft([row], tok, max_len=64, max_prompt_len=8)
    assert len(prompt) > 7 and stats["truncated_prompts"] == 1
    assert stats["truncated_sequences"] == 0
    inputs, targets, mask = real_doc(arrays, 0)
    np.testing.assert_array_equal(inputs[:8], [tok.bos_id] + prompt[-7:])
    np.testing.assert_array_equal(targets[mask == 1], completion + [tok.eos_id])


def test_long_sequence_is_cut_to_max_len_and_counted(tok):
    row = {"prompt": T.format_prompt("Q"),
           "completion": T.format_completion("words and more words " * 20)}
    arrays, stats = encode_sft([row], tok, max_len=32, max_prompt_len=16)
    assert stats["truncated_sequences"] == 1 and stats["truncated_prompts"] == 0
    assert (arrays["segment_ids"] == 1).all()  # the row is full
    assert tok.eos_id not in arrays["targets"][0]
    seq = [tok.bos_id] + tok.encode(row["prompt"]) + tok.encode(row["completion"])
    np.testing.assert_array_equal(arrays["targets"][0], seq[1:33])


def test_max_prompt_len_beyond_max_len_is_rejected(tok):
    with pytest.raises(ValueError, match="max_prompt_len"):
        encode_sft(sft_rows(1), tok, max_len=16, max_prompt_len=17)


def test_packing_keeps_documents_intact_with_segments_and_positions(tok):
    rows = sft_rows(12)
    plain, _ = encode_sft(rows, tok, max_len=96, max_prompt_len=64)
    packed, stats = encode_sft(rows, tok, max_len=96, max_prompt_len=64, pack=True)
    assert len(packed["inputs"]) < len(plain["inputs"]) == 12
    assert stats["examples"] == 12 and stats["rows"] == len(packed["inputs"])
    docs = []
    for r in range(len(packed["inputs"])):
        segments = packed["segment_ids"][r]
        n_docs = segments.max()
        # Segments are 1..k in contiguous blocks, then padding.
        real = segments[segments > 0]
        assert (np.diff(real) >= 0).all() and set(real) == set(range(1, n_docs + 1))
        assert (segments[len(real):] == 0).all()
        for s in range(1, n_docs + 1):
            np.testing.assert_array_equal(packed["positions"][r][segments == s],
                                          np.arange((segments == s).sum()))
            docs.append(real_doc(packed, r, s))
    assert len(docs) == 12
    for i, doc in enumerate(docs):
        for got, want in zip(doc, real_doc(plain, i)):
            np.testing.assert_array_equal(got, want)


def test_text_is_packed_with_loss_everywhere_and_long_documents_split(tok):
    rows = [{"text": "Some plain corpus text."}, {"text": "words and more words " * 30},
            {"text": "Short."}]
    arrays, stats = encode_text(rows, tok, max_len=32)
    np.testing.assert_array_equal(arrays["loss_mask"], arrays["segment_ids"] > 0)
    assert stats["split_documents"] == 1
    # Every token after each bos is a target exactly once, in order.
    targets = arrays["targets"][arrays["segment_ids"] > 0]
    want = []
    for row in rows:
        want += tok.encode(row["text"]) + [tok.eos_id]
    np.testing.assert_array_equal(targets, want)


def test_preference_arrays_share_prompt_and_mask_each_reply(tok):
    rows = [{"prompt": T.format_prompt(f"Question {i}?"), "chosen": " The answer is 2.",
             "rejected": f" No idea {i}, sorry.", "prob_chosen": 0.25 * i} for i in range(3)]
    arrays, stats = encode_preference(rows, tok, max_len=48, max_prompt_len=24)
    assert set(arrays) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in SEQ_KEYS} \
        | {"prob_chosen"}
    np.testing.assert_array_equal(arrays["prob_chosen"], np.float32([0.0, 0.25, 0.5]))
    assert arrays["prob_chosen"].dtype == np.float32
    for r, row in enumerate(rows):
        n_prompt = 1 + len(tok.encode(row["prompt"]))
        np.testing.assert_array_equal(arrays["chosen_inputs"][r, :n_prompt],
                                      arrays["rejected_inputs"][r, :n_prompt])
        for side in ("chosen", "rejected"):
            mask = arrays[f"{side}_loss_mask"][r] == 1
            np.testing.assert_array_equal(arrays[f"{side}_targets"][r][mask],
                                          tok.encode(row[side]) + [tok.eos_id])
    assert stats == {"examples": 3, "truncated_prompts": 0, "truncated_sequences": 0}


def test_shared_prefix_rows_hold_each_side_as_its_own_row_does(tok):
    """Read along the prefix and one branch, a shared row is that side's two-row row (inputs,
    positions; targets and loss in the response columns, the last ones), truncation included."""
    rows = [{"prompt": T.format_prompt(f"Question {i}?" * (1 + 4 * (i == 2))), "chosen": " The answer is 2.",
             "rejected": f" No idea {i}, sorry." * (1 + i), "prob_chosen": 1.0} for i in range(3)]
    kw = dict(max_len=24, max_prompt_len=12)
    pairs, stats = encode_preference(rows, tok, **kw)
    shared, shared_stats = encode_preference(rows, tok, **kw, shared_prefix=True)
    assert shared_stats == stats and stats["truncated_prompts"] == 1 and stats["truncated_sequences"] > 0
    assert set(shared) == {"inputs", "targets", "positions", "segment_ids", "branch_ids", "chosen_loss_mask",
                           "rejected_loss_mask", "prob_chosen"}
    width, responses = shared["inputs"].shape[1], shared["targets"].shape[1]
    assert width < 2 * kw["max_len"] and (shared["segment_ids"][:, -1] > 0).any()
    prefix = width - responses  # each prompt ends in the prefix's last column
    assert (shared["branch_ids"][:, :prefix] == 0).all() and (shared["segment_ids"][:, prefix - 1] > 0).all()
    for r in range(len(rows)):
        for branch, side in ((1, "chosen"), (2, "rejected")):
            cols = (shared["segment_ids"][r] > 0) & np.isin(shared["branch_ids"][r], (0, branch))
            real = pairs[f"{side}_segment_ids"][r] > 0
            for k in ("inputs", "positions"):
                np.testing.assert_array_equal(shared[k][r][cols], pairs[f"{side}_{k}"][r][real])
            own = shared["branch_ids"][r, prefix:] == branch
            n = own.sum()
            # The two-row targets are those of its last columns (`pair_arrays`).
            real_targets = real[real.size - pairs[f"{side}_targets"].shape[1]:]
            np.testing.assert_array_equal(shared["targets"][r][own], pairs[f"{side}_targets"][r][real_targets][-n:])
            np.testing.assert_array_equal(shared[f"{side}_loss_mask"][r][own],
                                          pairs[f"{side}_loss_mask"][r][real_targets][-n:])
            assert shared[f"{side}_loss_mask"][r].sum() == pairs[f"{side}_loss_mask"][r].sum()


def test_prompt_tokens_are_bos_plus_prompt_left_truncated(tok):
    rows = [{"prompt": T.format_prompt("Hi"), "answer": 1},
            {"prompt": T.format_prompt("Question 5: what is 5 times two?" + " more" * 10)}]
    arrays, stats = encode_prompts(rows, tok, max_prompt_len=12)
    short, long = (tok.encode(r["prompt"]) for r in rows)
    assert arrays["prompt_tokens"].shape == (2, 12) and arrays["prompt_tokens"].dtype == np.int32
    assert arrays["prompt_lens"].dtype == np.int32
    assert arrays["prompt_lens"].tolist() == [1 + len(short), 12]
    np.testing.assert_array_equal(arrays["prompt_tokens"][0],
                                  [tok.bos_id] + short + [tok.pad_id] * (11 - len(short)))
    np.testing.assert_array_equal(arrays["prompt_tokens"][1], [tok.bos_id] + long[-11:])
    assert stats["truncated_prompts"] == 1


# --------------------------------------------------------------------------- #
# BatchIterator.
# --------------------------------------------------------------------------- #

def make_arrays(n=50):
    return {"x": np.arange(n), "y": np.arange(n * 2).reshape(n, 2)}


def test_batch_is_a_pure_function_of_step():
    a = BatchIterator(make_arrays(), 8, seed=3)
    b = BatchIterator(make_arrays(), 8, seed=3)
    steps = [0, 17, 5, 17, 40, 1, 0]
    first = [a.batch(s) for s in steps]
    saved = np.random.get_state()
    try:
        np.random.seed(123)  # numpy's global state must neither matter nor change
        before = np.random.get_state()[1].copy()
        for s, want in zip(reversed(steps), reversed(first)):  # another query order
            got = b.batch(s)
            assert got.keys() == want.keys()
            for k in got:
                np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(np.random.get_state()[1], before)
    finally:
        np.random.set_state(saved)


def test_batch_rows_stay_aligned_across_arrays():
    batch = BatchIterator(make_arrays(), 8, seed=3).batch(4)
    np.testing.assert_array_equal(batch["y"], batch["x"][:, None] * 2 + [0, 1])


def test_each_example_appears_once_per_epoch_and_epochs_differ():
    it = BatchIterator(make_arrays(48), 8, seed=0)
    assert len(it) == 6 and it.epoch(5) == 0 and it.epoch(6) == 1
    epochs = [np.concatenate([it.batch(e * 6 + s)["x"] for s in range(6)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(48))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(48))


def test_remainder_is_dropped_and_unshuffled_order_is_sequential():
    it = BatchIterator(make_arrays(50), 8, seed=0, shuffle=False)
    assert len(it) == 6
    np.testing.assert_array_equal(it.batch(1)["x"], np.arange(8, 16))
    np.testing.assert_array_equal(it.batch(6)["x"], np.arange(8))


def test_process_slices_partition_the_global_batch():
    full = BatchIterator(make_arrays(), 12, seed=7)
    parts = [BatchIterator(make_arrays(), 12, seed=7, process_index=p, process_count=3)
             for p in range(3)]
    for step in (0, 3, 9):
        local = [p.batch(step)["x"] for p in parts]
        assert all(len(x) == 4 for x in local)
        np.testing.assert_array_equal(np.concatenate(local), full.batch(step)["x"])


def test_bad_batch_configurations_are_named():
    with pytest.raises(ValueError, match="50 examples .* batch_size=64"):
        BatchIterator(make_arrays(), 64, seed=0)
    with pytest.raises(ValueError, match="batch_size=10 not divisible by process_count=4"):
        BatchIterator(make_arrays(), 10, seed=0, process_count=4)


def test_unpaired_rows_text_and_conversational_and_pairs_split_into_two(tmp_path, tok):
    rows = [{"prompt": "What is 2 times two?", "completion": "The answer is 4.", "label": True},
            {"prompt": [{"role": "user", "content": "What is 3 times two?"}],
             "completion": [{"role": "assistant", "content": "The answer is 5."}], "label": False}]
    got, _ = load_rows(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired", template=T)
    assert got[0] == {"prompt": T.format_prompt("What is 2 times two?"),
                      "completion": T.format_completion("The answer is 4."), "label": True}
    assert got[1]["prompt"] == T.format_prompt("What is 3 times two?") and got[1]["label"] is False
    with pytest.raises(DataError, match="row 0: field 'label'"):
        load_rows(write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], label=1)]), "unpaired", template=T)
    pairs = [{"prompt": "What is 1 times two?", "chosen": "The answer is 2.", "rejected": "It is 3."}]
    paired, _ = load_rows(write_jsonl(tmp_path / "p.jsonl", pairs), "unpaired", template=T)
    arrays, stats = data.encode_unpaired(got + paired, tok, max_len=40, max_prompt_len=24)
    assert stats["examples"] == 4 and stats["desirable"] == 2
    np.testing.assert_array_equal(arrays["label"], [1, 0, 1, 0])
    assert arrays["completion"].shape == (4, 17) and arrays["prompt_tokens"].shape == (4, 24)
    # The same tokens as SFT's layout: [bos] + prompt, then the completion and eos.
    sft, _ = encode_sft([{"prompt": paired[0]["prompt"], "completion": paired[0]["rejected"]}], tok,
                        max_len=40, max_prompt_len=24)
    n, m = arrays["prompt_lens"][3], arrays["completion_lens"][3]
    seq = list(arrays["prompt_tokens"][3, :n]) + list(arrays["completion"][3, :m])
    assert seq[-1] == tok.eos_id and seq == [sft["inputs"][0, 0]] + list(sft["targets"][0, :n + m - 1])


@pytest.mark.parametrize("label, problem", [
    (None, "missing; an unpaired (KTO) row needs label true (desirable) or false"),
    ("yes", "expected true or false, got 'yes'"),
])
def test_a_kto_row_without_its_label_names_the_field(tmp_path, label, problem):
    second = {"prompt": "b", "completion": "c"} if label is None else {"prompt": "b", "completion": "c", "label": label}
    src = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "c", "label": True}, second])
    with pytest.raises(DataError) as err:
        load_rows(src, "unpaired")
    assert str(err.value) == f"{src}: row 1: field 'label': {problem}"


def test_a_prompt_longer_than_max_prompt_len_is_cut_with_one_warning(tok, monkeypatch):
    warned = []
    monkeypatch.setattr(data.logging, "warning", lambda msg, *args: warned.append(msg % args))
    rows = [{"prompt": "one two three four five six seven eight"}, {"prompt": "one"}]
    arrays, stats = encode_prompts(rows, tok, max_prompt_len=4)
    assert stats["truncated_prompts"] == 1 and arrays["prompt_lens"].max() == 4
    assert warned == ["1 of 2 prompts are longer than data.max_prompt_len=4 tokens: each is cut to its last 4 tokens"]
    encode_prompts(rows[1:], tok, max_prompt_len=4)
    assert len(warned) == 1
