"""ptx.tokenizer.HFTokenizer against transformers: same ids, text, stop ids and assistant masks,
on the tokenizer directories of tests/chat_dirs.py (one per family: Llama 3, Qwen3, Gemma 3)."""
import json
import os

import pytest
import tokenizers

from ptx import hf
from ptx.tokenizer import HFTokenizer, Tokenizer, train_tokenizer

from chat_dirs import CHATS, FAMILIES, SPECIALS, TEXTS, corpus, hf_ids, write_dir


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_equal_transformers(toks, hf_toks, family):
    tok, ref = toks[family], hf_toks[family]
    assert isinstance(tok, HFTokenizer)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    with_specials = [tok.id_of(SPECIALS[family][-1])] + tok.encode(TEXTS[8]) + [tok.eos_id, tok.pad_id]
    assert tok.decode(with_specials) == ref.decode(with_specials, skip_special_tokens=True) == TEXTS[8]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_and_vocab_size_equal_transformers(toks, hf_toks, family):
    tok, ref = toks[family], hf_toks[family]
    assert tok.vocab_size == len(ref) == tok.id_of(SPECIALS[family][-1]) + 1  # specials come last
    assert tok.eos_id == ref.eos_token_id
    assert tok.bos_id == (-1 if ref.bos_token_id is None else ref.bos_token_id)
    assert tok.pad_id == (tok.eos_id if ref.pad_token_id is None else ref.pad_token_id)
    for token in SPECIALS[family]:
        assert tok.id_of(token) == ref.convert_tokens_to_ids(token)
    with pytest.raises(KeyError, match="no-such-token"):
        tok.id_of("no-such-token")


def test_stop_ids_come_from_eos_token_then_generation_config(toks):
    llama, qwen, gemma = (toks[f] for f in FAMILIES)
    assert llama.eos_ids == tuple(llama.id_of(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
    assert qwen.eos_ids == (qwen.id_of("<|im_end|>"), qwen.id_of("<|endoftext|>"))
    assert gemma.eos_ids == (gemma.id_of("<eos>"), gemma.id_of("<end_of_turn>"))
    assert (llama.bos_id, qwen.bos_id) == (llama.id_of("<|begin_of_text|>"), -1)
    assert gemma.pad_id == gemma.id_of("<pad>")  # from special_tokens_map.json


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("family", FAMILIES)
def test_apply_chat_template_equals_transformers(toks, hf_toks, family, chat, add_generation_prompt):
    tok, ref, messages = toks[family], hf_toks[family], CHATS[chat]
    text = tok.render_chat(messages, add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_ids(ref, messages, add_generation_prompt=add_generation_prompt)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_template_sees_special_tokens_and_folds_the_system_turn(toks):
    gemma = toks["gemma3"].render_chat(CHATS["system"], add_generation_prompt=True)
    assert gemma.startswith("<bos><start_of_turn>user\nYou are terse.\n\nName a colour.<end_of_turn>\n")
    assert gemma.endswith("<start_of_turn>model\n")
    llama = toks["llama3"].apply_chat_template(CHATS["one_turn"])
    assert llama[:2] == [toks["llama3"].bos_id, toks["llama3"].id_of("<|start_header_id|>")]


def test_qwen3_reasoning_tools_and_template_kwargs_equal_transformers(toks, hf_toks):
    tok, ref = toks["qwen3"], hf_toks["qwen3"]
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds, exactement.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    chats = [
        CHATS["multi"][:-1] + [{"role": "assistant", "content": "<think>\nhmm, 犬\n</think>\n\nInu."}],
        CHATS["multi"] + [{"role": "tool", "content": "4"},
                          {"role": "assistant", "content": "Four.", "reasoning_content": "Add them."}],
        CHATS["one_turn"] + [{"role": "assistant", "content": "4", "reasoning_content": None}],
    ]
    for messages in chats:
        for kwargs in ({}, {"tools": tools}, {"enable_thinking": False, "add_generation_prompt": True}):
            assert tok.render_chat(messages, **kwargs) == ref.apply_chat_template(messages, tokenize=False,
                                                                                 **kwargs)
            assert tok.apply_chat_template(messages, **kwargs) == hf_ids(ref, messages, **kwargs)
    assert "<think>\nAdd them.\n</think>\n\nFour." in tok.render_chat(chats[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_spans_equal_transformers_generation_masks(toks, hf_toks, family):
    tok, ref = toks[family], hf_toks[family]
    chats = [CHATS["multi"], CHATS["system"][:3]]
    if family == "qwen3":
        chats.append(CHATS["multi"] + [{"role": "tool", "content": "4"},
                                       {"role": "assistant", "content": "Four.", "reasoning_content": "Sum."}])
    for messages in chats:
        ids, spans = tok.assistant_spans(messages)
        assert ids == tok.apply_chat_template(messages)
        assert len(spans) == sum(m["role"] == "assistant" for m in messages)
        out = ref.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        mask = [int(any(s <= j < e for s, e in spans)) for j in range(len(ids))]
        assert mask == list(out["assistant_masks"])
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        for (start, end), reply in zip(spans, replies):
            assert ids[end - 1] in tok.eos_ids
            # Qwen3's turns after the last user message start with their <think> block.
            assert tok.decode(ids[start:end]).strip().endswith(reply.strip())


def test_assistant_spans_need_history_that_later_turns_leave_unchanged(toks):
    # With enable_thinking=False the generation prompt ends in an empty think block, which the
    # template writes only into turns after the last user message.
    with pytest.raises(ValueError, match="before message 2 .* is not a prefix"):
        toks["qwen3"].assistant_spans(CHATS["multi"], enable_thinking=False)
    ids, spans = toks["qwen3"].assistant_spans(CHATS["multi"][:3], enable_thinking=False)
    assert toks["qwen3"].decode(ids[spans[0][0]:spans[0][1]]) == " 猫 (neko).\n"


def test_assistant_spans_need_a_stop_token(dirs, tmp_path):
    path = write_dir(tmp_path / "nostop", tokenizers.Tokenizer.from_file(
            os.path.join(dirs["gemma3"], "tokenizer.json")).to_str(), "gemma3")
    os.remove(os.path.join(path, "generation_config.json"))  # <end_of_turn> is no longer a stop id
    tok = hf.load_tokenizer(path)
    assert tok.eos_ids == (tok.id_of("<eos>"),)
    with pytest.raises(ValueError, match="assistant message 2 does not end with a stop token"):
        tok.assistant_spans(CHATS["system"][:3])


def test_template_errors_name_the_file_and_message(toks, dirs, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer_config.json \(default\).*must alternate"):
        toks["gemma3"].apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):
        toks["qwen3"].render_chat([])
    bad = {"broken": "{% for m in messages %}{{ m.content }}",
           "mutates": "{{ messages.append(1) }}",
           "dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
           "escapes": "{{ ''.__class__.__mro__ }}"}
    for name, template in bad.items():
        path = write_dir(tmp_path / name, tokenizers.Tokenizer.from_file(
                os.path.join(dirs["qwen3"], "tokenizer.json")).to_str(), "qwen3")
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template)
        tok = hf.load_tokenizer(path)  # a broken template does not stop plain encoding
        assert tok.encode("hi") == toks["qwen3"].encode("hi")
        with pytest.raises(ValueError, match=r"chat_template.jinja \(default\)"):
            tok.render_chat(CHATS["one_turn"])
    os.remove(os.path.join(path, "chat_template.jinja"))
    with pytest.raises(ValueError, match="no chat template 'default'"):
        hf.load_tokenizer(path).render_chat(CHATS["one_turn"])


def test_load_tokenizer_picks_the_file_and_names_missing_or_malformed_ones(dirs, tmp_path):
    spm_dir = tmp_path / "spm"
    spm = train_tokenizer(corpus(), vocab_size=500, path=str(spm_dir / "tokenizer.model"))
    loaded = hf.load_tokenizer(str(spm_dir))
    assert isinstance(loaded, Tokenizer) and loaded.eos_ids == (spm.eos_id,)
    assert loaded.encode(TEXTS[8]) == spm.encode(TEXTS[8])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer.json.*tokenizer.model"):
        hf.load_tokenizer(str(empty))
    source = tokenizers.Tokenizer.from_file(os.path.join(dirs["llama3"], "tokenizer.json")).to_str()
    for name, text in [("tokenizer_config.json", "{not json"), ("generation_config.json", "[1, 2"),
                       ("special_tokens_map.json", "[]"), ("tokenizer.json", "{}")]:
        path = write_dir(tmp_path / name, source, "llama3")
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=name):
            hf.load_tokenizer(path)
    path = write_dir(tmp_path / "bad_stop", source, "llama3")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": "<|eot_id|>"}, f)
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list"):
        hf.load_tokenizer(path)
