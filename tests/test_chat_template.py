"""ptx.tokenizer.HFTokenizer against transformers: same ids, text, stop ids and assistant masks.

Three small byte-level BPE tokenizers are trained here, one per family, with
chat templates written in the style of Llama 3 (header ids, <|eot_id|>),
Qwen3 (<|im_start|>, think blocks) and Gemma 3 (<start_of_turn>, system
folded into the first user turn, BOS written by the template). Each template
marks assistant text with `{% generation %}`, so transformers' assistant
masks check `assistant_spans`, which does not read the markers.
"""
import json
import os

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ptx import hf
from ptx.tokenizer import HFTokenizer, Tokenizer, train_tokenizer

LLAMA3 = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Knowledge cutoff: 2023\nYear: ' + (year if year is defined else strftime_now('%Y')) + '\n\n' }}
{%- if tools is not none %}
    {{- 'Functions you may call:\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=2) + '\n' }}
    {%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for m in turns %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}
    {%- if m['role'] == 'assistant' %}
        {%- generation %}{{- m['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- m['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN3 = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages | length - 1, searching=true) %}
{%- for m in messages | reverse %}
    {%- if ns.searching and m.role == 'user' %}
        {%- set ns.last_user = messages | length - loop.index %}
        {%- set ns.searching = false %}
    {%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content if m.content is string else '' %}
    {%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
        {%- if m.reasoning_content is not string and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}
                {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- content }}
            {%- endif %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif m.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA3 = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_prefix = messages[0]['content'] | trim + '\n\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set first_prefix = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- for m in turns %}
    {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if m['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}{{- m['content'] | trim + '<end_of_turn>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<start_of_turn>' + m['role'] + '\n' + (first_prefix if loop.first else '') }}
        {{- m['content'] | trim + '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eom_id|>", "<|eot_id|>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma3": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
}
FAMILIES = tuple(SPECIALS)

TEXTS = [
    "",
    " ",
    "\n",
    "Hello world",
    "  two leading spaces and two trailing  ",
    " one leading space",
    "line one\nline two\n\nafter a blank line\n",
    "\n\nstarts with newlines\r\nand a windows one\ttab",
    "naïve café, Ωmega, 日本語のテキスト, Привет мир, 😀🎉, e\u0301 combining, \u00a0nbsp",
    "digits 0123456789 and 3.14159e-10 and -42",
    "punctuation !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
]

CHATS = {
    "one_turn": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  Name a colour.\n"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in Français?"},
    ],
    "multi": [
        {"role": "system", "content": "Réponds brièvement."},
        {"role": "user", "content": "Translate 'cat' to 日本語."},
        {"role": "assistant", "content": " 猫 (neko).\n"},
        {"role": "user", "content": "And 'dog'?\n\nOne word."},
        {"role": "assistant", "content": "犬 😀"},
    ],
}


def corpus() -> list[str]:
    lines = []
    for i in range(150):
        lines.append(f"The quick brown fox {i} jumps over the lazy dog.\n  Indented, with  two spaces.")
        lines.append(f"User asks: what is {i} plus {i}? Assistant answers: {2 * i}. Merci, café, naïve.")
        lines.append("日本語のテキスト, Привет мир, Ωmega and émoji 😀 " * (1 + i % 3))
    return lines


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A byte-level BPE (no special tokens yet) as tokenizer.json text."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
            vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok.to_str()


def write_dir(path, bpe_json: str, family: str) -> str:
    """A tokenizer directory of `family`: specials after the BPE vocabulary, config, template, stops."""
    tok = tokenizers.Tokenizer.from_str(bpe_json)
    tok.add_special_tokens(SPECIALS[family])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    files = {}
    if family == "llama3":
        # The eos as an AddedToken dict, the template as a string, three stop ids.
        config.update(bos_token="<|begin_of_text|>", chat_template=LLAMA3.strip(),
                      eos_token={"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False,
                                 "rstrip": False, "normalized": False, "single_word": False, "special": True})
        files["generation_config.json"] = {"eos_token_id": [tok.token_to_id(t) for t in
                                                            ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]}
    elif family == "qwen3":
        # No BOS, the template in chat_template.jinja, one more stop id given as an int.
        config.update(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        files["generation_config.json"] = {"eos_token_id": tok.token_to_id("<|endoftext|>")}
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(QWEN3.strip())
    else:
        # Named templates, and the pad token only in the legacy special_tokens_map.json.
        config.update(bos_token="<bos>", eos_token="<eos>",
                      chat_template=[{"name": "default", "template": GEMMA3.strip()},
                                     {"name": "rag", "template": "{{ raise_exception('unused') }}"}])
        files["special_tokens_map.json"] = {"pad_token": {"content": "<pad>", "lstrip": False}}
        files["generation_config.json"] = {"eos_token_id": [tok.token_to_id(t)
                                                            for t in ("<eos>", "<end_of_turn>")]}
    files["tokenizer_config.json"] = config
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
    return str(path)


@pytest.fixture(scope="module")
def dirs(bpe_json, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_tok")
    return {f: write_dir(root / f, bpe_json, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def toks(dirs) -> dict:
    return {f: hf.load_tokenizer(d) for f, d in dirs.items()}


@pytest.fixture(scope="module")
def hf_toks(dirs) -> dict:
    transformers = pytest.importorskip("transformers")
    return {f: transformers.AutoTokenizer.from_pretrained(d) for f, d in dirs.items()}


def hf_ids(hf_tok, messages, **kwargs) -> list[int]:
    """transformers' apply_chat_template ids (v5 returns a BatchEncoding by default)."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


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
