"""Hugging Face tokenizer directories for the tests (conftest.py's fixtures bpe_json, dirs, toks,
hf_toks build them once per session).

Three small byte-level BPE tokenizers, one per family, with chat templates
written in the style of Llama 3 (header ids, <|eot_id|>), Qwen3
(<|im_start|>, think blocks) and Gemma 3 (<start_of_turn>, system folded into
the first user turn, BOS written by the template). Each template marks
assistant text with `{% generation %}`, so transformers' assistant masks check
`assistant_spans`, which does not read the markers.
"""
import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

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


def make_bpe_json() -> str:
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


def hf_ids(hf_tok, messages, **kwargs) -> list[int]:
    """transformers' apply_chat_template ids (v5 returns a BatchEncoding by default)."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
