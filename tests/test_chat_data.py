"""TRL's conversational formats through a chat template: rows stay messages, the loss mask is the
rendered template's assistant spans (transformers' assistant masks), prompts end with the
generation prompt; without a chat template the same rows render in the HH template."""

import numpy as np
import pytest

from ptx import data
from ptx.data import DataError, load_rows
from ptx.tokenizer import PromptTemplate

from chat_dirs import FAMILIES
from conftest import write_jsonl

T = PromptTemplate()
SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [SYSTEM, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green, of course."}]
PROMPT, REPLY = CHAT[:4], CHAT[4:]


def test_conversational_rows_stay_messages_for_a_chat_template(tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])
    assert load_rows(messages, "sft", chat=True)[0] == [{"messages": CHAT, "train_from": 0}]
    pairs = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": REPLY}])
    assert load_rows(pairs, "sft", chat=True)[0] == [{"messages": CHAT, "train_from": 4}]
    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q?", "completion": "A."}])
    assert load_rows(strings, "sft", chat=True)[0] == [{"messages": [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "train_from": 1}]
    worse = [{"role": "assistant", "content": "Red."}]
    formats = [{"prompt": PROMPT, "chosen": REPLY, "rejected": worse},
               {"chosen": PROMPT + REPLY, "rejected": PROMPT + worse, "prob_chosen": 0.7},  # implicit prompt
               {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
               {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}]
    rows = [load_rows(write_jsonl(tmp_path / f"p{i}.jsonl", [row]), "preference", chat=True)[0][0]
            for i, row in enumerate(formats)]
    assert rows[0] == {"prompt": PROMPT, "chosen": REPLY, "rejected": worse, "prob_chosen": 1.0}
    assert rows[1] == {"prompt": PROMPT, "chosen": REPLY, "rejected": worse, "prob_chosen": 0.7}
    assert rows[2]["prompt"] == [{"role": "user", "content": "Q?"}] and rows[2]["chosen"][0]["content"] == "yes"
    assert rows[3]["prompt"] == [{"role": "user", "content": "Hi"}] and rows[3]["rejected"][0]["content"] == "Go."
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPT, "answer": 4}, {"prompt": "Q?"}])
    rows, _ = load_rows(prompts, "prompt", chat=True)
    assert rows == [{"prompt": PROMPT, "answer": 4}, {"prompt": [{"role": "user", "content": "Q?"}]}]


def test_without_a_chat_template_conversations_render_in_the_hh_template(tmp_path):
    (from_prompt,), _ = load_rows(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": PROMPT, "completion": REPLY}]), "sft")
    (all_turns,), _ = load_rows(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), "sft")
    history = "\n\nHuman: You are terse.\n\nHuman: Name a colour.\n\nAssistant:"
    # prompt-completion: only the completion is trained; messages: every assistant turn.
    assert from_prompt == {"prompt": history + " Blue.\n\nHuman: Another?\n\nAssistant:",
                           "completion": " Green, of course."}
    assert all_turns == {"prompt": history, "completion": " Blue.",
                         "turns": [["\n\nHuman: Another?\n\nAssistant:", " Green, of course."]]}
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"chosen": CHAT, "rejected": PROMPT + [
        {"role": "assistant", "content": "Red."}]}])
    rows, _ = load_rows(prefs, "preference")
    assert rows == [{"prompt": from_prompt["prompt"], "chosen": " Green, of course.", "rejected": " Red.",
                     "prob_chosen": 1.0}]
    rows, _ = load_rows(write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPT}]), "prompt")
    assert rows == [{"prompt": from_prompt["prompt"]}]


@pytest.mark.parametrize("row, field, problem", [
    ({"messages": [{"role": "user", "content": "Q"}]}, "messages", "last message must have role 'assistant'"),
    ({"messages": [{"role": "robot", "content": "Q"}]}, "messages[0].role", "expected one of"),
    ({"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}, "completion", "expected list"),
])
def test_bad_conversational_sft_rows_name_the_field(tmp_path, row, field, problem):
    src = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=rf"row 0: field '{field}'.*: {problem}" if "[" not in field
                       else rf"row 0: field 'messages\[0\]\.role': {problem}"):
        load_rows(src, "sft", chat=True)


def test_implicit_prompt_needs_a_shared_start_and_differing_replies(tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"chosen": CHAT, "rejected": CHAT}])
    with pytest.raises(DataError, match="no shared prompt before differing replies"):
        load_rows(same, "preference", chat=True)
    two = write_jsonl(tmp_path / "two.jsonl", [{"chosen": PROMPT + REPLY * 2, "rejected": PROMPT + REPLY[:0] + [
        {"role": "assistant", "content": "No."}]}])
    with pytest.raises(DataError, match="field 'chosen': the configured template takes one assistant reply"):
        load_rows(two, "preference")


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_mask_is_every_assistant_span_as_transformers_masks_it(toks, hf_toks, family):
    tok, ref = toks[family], hf_toks[family]
    rows = [{"messages": CHAT, "train_from": 0}, {"messages": CHAT, "train_from": 4}]
    arrays, stats = data.encode_sft(rows, tok, max_len=192, max_prompt_len=192)
    out = ref.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"])
    n = len(ids) - 1
    # The template's own ids (its bos included, no extra one), shifted by one for the targets.
    assert list(arrays["inputs"][0, :n]) == ids[:-1] and list(arrays["targets"][0, :n]) == ids[1:]
    np.testing.assert_array_equal(arrays["loss_mask"][0, :n], mask[1:])
    assert arrays["loss_mask"][0, n:].sum() == 0 and stats["truncated_sequences"] == 0
    # prompt-completion: the last assistant turn only.
    last = mask.copy()
    last[:len(tok.apply_chat_template(PROMPT, add_generation_prompt=True))] = 0
    np.testing.assert_array_equal(arrays["loss_mask"][1, :n], last[1:])
    assert 0 < last.sum() < mask.sum()
    everything, _ = data.encode_sft(rows, tok, max_len=192, max_prompt_len=192, loss_on_prompt=True)
    assert everything["loss_mask"][0, :n].all()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_end_with_the_generation_prompt_and_preferences_train_the_replies(toks, hf_toks, family):
    tok, ref = toks[family], hf_toks[family]
    arrays, _ = data.encode_prompts([{"prompt": PROMPT}], tok, max_prompt_len=192)
    want = list(ref.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"])
    assert list(arrays["prompt_tokens"][0, :arrays["prompt_lens"][0]]) == want
    assert data.prompt_text({"prompt": PROMPT}, tok) == ref.apply_chat_template(PROMPT, tokenize=False,
                                                                               add_generation_prompt=True)
    short, stats = data.encode_prompts([{"prompt": PROMPT}], tok, max_prompt_len=8)
    assert list(short["prompt_tokens"][0]) == want[-8:] and stats["truncated_prompts"] == 1
    worse = [{"role": "assistant", "content": "Red."}]
    pref, _ = data.encode_preference([{"prompt": PROMPT, "chosen": REPLY, "rejected": worse, "prob_chosen": 1.0}],
                                     tok, max_len=192, max_prompt_len=192)
    for side, reply in (("chosen", REPLY), ("rejected", worse)):
        ids = tok.apply_chat_template(PROMPT + reply)
        trained = [int(t) for t, m in zip(pref[f"{side}_targets"][0], pref[f"{side}_loss_mask"][0]) if m]
        # The reply and its stop token, as sampling from the generation prompt would produce them.
        assert trained == ids[len(want):len(want) + len(trained)] and trained[-1] in tok.eos_ids
        # (Qwen3 writes an empty think block before the reply after the last user turn.)
        assert tok.decode(trained).strip().endswith(reply[0]["content"])


def test_a_template_that_raises_names_the_example_and_the_template_file(toks):
    gemma = toks["gemma3"]  # its template insists on alternating user / assistant turns
    rows = [{"messages": CHAT, "train_from": 0},
            {"messages": [{"role": "assistant", "content": "Hi"}] * 2, "train_from": 0}]
    with pytest.raises(ValueError, match=r"example 1: .*tokenizer_config.json \(default\): chat template raised"):
        data.encode_sft(rows, gemma, max_len=64, max_prompt_len=32)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpaired_chat_rows_split_at_the_template_s_last_assistant_span(tmp_path, toks, family):
    tok = toks[family]
    rows = [{"prompt": PROMPT, "completion": REPLY, "label": True},
            {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Red."}], "label": False}]
    loaded, _ = load_rows(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired", chat=True)
    assert [r["label"] for r in loaded] == [True, False] and loaded[0]["messages"] == CHAT
    arrays, stats = data.encode_unpaired(loaded, tok, max_len=256, max_prompt_len=128)
    assert stats["desirable"] == 1 and arrays["label"].tolist() == [1.0, 0.0]
    for i, reply in enumerate((REPLY, rows[1]["completion"])):
        ids, spans = tok.assistant_spans(PROMPT + reply)
        start, end = spans[-1]
        p, c = arrays["prompt_lens"][i], arrays["completion_lens"][i]
        # The prompt is the rendering up to the reply (its generation prompt included), the
        # completion the reply's span through its stop token: together, the whole rendering.
        assert arrays["prompt_tokens"][i, :p].tolist() == ids[:start]
        assert arrays["completion"][i, :c].tolist() == ids[start:end] and ids[end - 1] in tok.eos_ids
        assert tok.apply_chat_template(PROMPT, add_generation_prompt=True) == ids[:start]


def test_a_conversation_the_template_cannot_render_is_a_row_error_naming_file_row_and_field(tmp_path, toks):
    gemma = toks["gemma3"]  # its template insists on alternating user / assistant turns
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT},
                                                  {"messages": [{"role": "assistant", "content": "Hi"}] * 2}])
    with pytest.raises(DataError, match=f"^{path}: row 2: field 'messages': the chat template cannot render it: "
                                        r".*chat template raised"):
        load_rows(path, "sft", chat=gemma)
    rows, stats = load_rows(path, "sft", chat=gemma, on_bad_row="skip")
    assert len(rows) == 2 and stats["skipped"] == 1
    assert [(r["row"], r["field"]) for r in stats["skipped_rows"]] == [(2, "messages")]
    assert data.encode_sft(rows, gemma, max_len=64, max_prompt_len=32)[1]["examples"] == 2


def test_a_preference_side_the_template_cannot_render_names_that_side(tmp_path, toks):
    gemma = toks["gemma3"]
    bad = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": PROMPT, "chosen": REPLY, "rejected": bad}])
    with pytest.raises(DataError, match=f"^{path}: row 0: field 'rejected': the chat template cannot render it"):
        load_rows(path, "preference", chat=gemma)
