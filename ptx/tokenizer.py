"""Tokenizers: SentencePiece (train / load), Hugging Face tokenizer.json with its
chat template, and the Human/Assistant prompt template.

Text conventions, shared by every stage so that a prompt formatted for SFT is
the same prompt the sampler and the reward model see:

    prompt     = "\\n\\nHuman: " + user text + "\\n\\nAssistant:"
    completion = " " + assistant text, stripped of surrounding whitespace

A training sequence is `[bos] + encode(prompt) + encode(completion) + [eos]`:
prompt and completion are encoded separately, and the tokenizer is trained
without a dummy prefix, so `decode(encode(a) + encode(b)) == a + b` and the
prompt/completion boundary is always a token boundary.

`HFTokenizer` reads a Hugging Face directory (Llama 3, Qwen3, Gemma 3, ...)
and gives the ids that transformers gives: `encode`, `decode` and
`apply_chat_template`, whose Jinja template is rendered as transformers
renders it.
"""
import bisect
import dataclasses
import io
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence

import jinja2
import sentencepiece as spm
import tokenizers

from ptx.chat_template import CHAT_TEMPLATE, TOKENIZER_CONFIG, compile_template, plain_message, read_templates
from ptx.sources import DataError, read_json_object

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The files of a Hugging Face tokenizer directory that HFTokenizer reads.
TOKENIZER_JSON = "tokenizer.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
SPM_MODEL = "tokenizer.model"
# What HFTokenizer.save copies: the files transformers' AutoTokenizer and generate read.
HF_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE, GENERATION_CONFIG,
            "added_tokens.json", "vocab.json", "merges.txt", SPM_MODEL)
# AddedToken flags that a tokenizer_config.json token dict may carry.
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Anthropic HH-RLHF style turns: "\\n\\nHuman: ...\\n\\nAssistant: ..."."""
    user_prefix: str = "\n\nHuman: "
    assistant_prefix: str = "\n\nAssistant:"

    def format_prompt(self, prompt: str) -> str:
        """A single user turn, ending where the assistant starts speaking."""
        return self.user_prefix + prompt + self.assistant_prefix

    def format_completion(self, completion: str) -> str:
        """The reply as it follows the assistant prefix: " " + completion.strip().

        Stripping makes {prompt, completion} rows and HH transcripts (whose
        responses already start with a space) produce identical text.
        """
        return " " + completion.strip()

    def messages_to_pair(self, messages: Sequence[dict]) -> tuple[str, str]:
        """Chat messages -> (prompt text, completion text).

        messages: [{'role': 'user' | 'assistant' | 'system', 'content': str}];
        the last one must be the assistant's reply, which becomes the completion.
        Earlier turns form the prompt, which ends with `assistant_prefix`. A
        system message is rendered as a user turn (the template has no system
        role).
        """
        if not messages:
            raise ValueError("messages: empty list")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                    f"messages: last message must have role 'assistant', got "
                    f"{messages[-1]['role']!r}")
        parts = []
        for i, m in enumerate(messages[:-1]):
            if m["role"] in ("user", "system"):
                parts.append(self.user_prefix + m["content"])
            elif m["role"] == "assistant":
                parts.append(self.assistant_prefix + self.format_completion(m["content"]))
            else:
                raise ValueError(f"messages[{i}]: unknown role {m['role']!r}")
        prompt = "".join(parts) + self.assistant_prefix
        return prompt, self.format_completion(messages[-1]["content"])

    def special_strings(self) -> tuple[str, str]:
        """The turn markers without their trailing space, e.g. "\\n\\nHuman:".

        The space stays out so that it joins the following word ("▁What").
        """
        return self.user_prefix.rstrip(" "), self.assistant_prefix.rstrip(" ")


class Tokenizer:
    """A loaded SentencePiece model. Ids are python ints; no BOS/EOS is added."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.eos_ids: tuple[int, ...] = (self.eos_id,) if self.eos_id >= 0 else ()
        # -1 marks a disabled special; it never occurs in ids so filtering it is harmless.
        self._control = {self.pad_id, self.bos_id, self.eos_id}

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (one C++ call, faster than a Python loop)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping pad, bos and eos ids (e.g. a padded sample row)."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self._control])

    has_chat_template = False

    def save(self, directory: str):
        """Copies the model to `directory`/tokenizer.model."""
        os.makedirs(directory, exist_ok=True)
        out = os.path.join(directory, SPM_MODEL)
        if os.path.abspath(out) != os.path.abspath(self.path):
            shutil.copyfile(self.path, out)

    def id_of(self, piece: str) -> int:
        """Id of a vocabulary piece in SentencePiece notation ("▁A", "<0x0A>").

        Raises KeyError if the piece is not in the vocabulary (SentencePiece would
        silently return the unk id).
        """
        i = self._sp.piece_to_id(piece)
        if i == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            raise KeyError(f"piece {piece!r} not in vocabulary of {self.path}")
        return i

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> "Tokenizer | HFTokenizer":
    """A SentencePiece .model file, or a directory: its tokenizer.json (an HFTokenizer, with the chat
    template and stop ids) or else its tokenizer.model. FileNotFoundError names what is missing."""
    if not os.path.isdir(path):
        return Tokenizer(path)
    if os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
        return HFTokenizer(path)
    if os.path.isfile(os.path.join(path, SPM_MODEL)):
        return Tokenizer(os.path.join(path, SPM_MODEL))
    raise FileNotFoundError(f"{path}: no tokenizer (looked for {TOKENIZER_JSON} and {SPM_MODEL})")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, path: str,
                                        model_type: str = "bpe",
                                        template: PromptTemplate = PromptTemplate()) -> Tokenizer:
    """Trains a SentencePiece model on in-memory texts and writes it to `path`.

    Deterministic: the same texts give a byte-identical .model (one thread, no
    sampling or shuffling of the input). `vocab_size` is an upper bound: a
    small corpus may yield fewer pieces instead of an error.

    The settings make `decode(encode(s)) == s` for any string: identity
    normalisation, no dummy prefix, no whitespace collapsing, and byte fallback
    for characters never seen in training. Digits are split one per token, and
    the template's turn markers are single tokens.
    """
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(template.special_strings()),
            hard_vocab_limit=False,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            # Whole dialogues are one "sentence"; the default (4192 bytes) would
            # silently drop long ones from training.
            max_sentence_length=1 << 16,
            minloglevel=2,
    )
    dirname = os.path.dirname(path)
    if dirname:
        os.makedirs(dirname, exist_ok=True)
    # Write, then rename over `path`: every process of a multi-host run trains this same
    # model into the shared workdir, and none may load another's half-written file.
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(writer.getvalue())
    os.replace(tmp, path)
    return Tokenizer(path)


class HFTokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json, its special tokens, stop ids and chat template.

    Gives transformers' ids: encode adds no special token, decode drops them,
    apply_chat_template renders the Jinja template as transformers does.
    Ids are python ints. bos_id is -1 when the model has no BOS (Qwen). Without
    a pad token (Llama 3) pad_id is eos_id: padding is masked explicitly, so
    any valid id serves. eos_ids are all stop ids: eos_token, then
    generation_config.json's eos_token_id (int or list; Llama 3 instruct stops
    on <|eot_id|>, <|eom_id|> and <|end_of_text|>); eos_id is the first.
    """

    def __init__(self, path: str):
        self.path = path
        file = os.path.join(path, TOKENIZER_JSON)
        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON or a missing model
            raise DataError(f"{file}: not a tokenizers file: {e}") from e
        # transformers encodes without the truncation / padding a tokenizer.json may carry.
        self._tok.no_truncation()
        self._tok.no_padding()
        config = _read_json(os.path.join(path, TOKENIZER_CONFIG))
        special = _special_tokens(config, _read_json(os.path.join(path, SPECIAL_TOKENS_MAP)))
        # Like transformers, named special tokens that tokenizer.json lacks become added tokens, so
        # a template's "<bos>" is one id and decode drops it.
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        self._tok.add_special_tokens([t for t in special.values() if t.content not in added])
        ids = {name: self._tok.token_to_id(t.content) for name, t in special.items()}
        stop = _read_json(os.path.join(path, GENERATION_CONFIG)).get("eos_token_id")
        stop = [] if stop is None else [stop] if isinstance(stop, int) else stop
        if not isinstance(stop, list) or not all(isinstance(i, int) for i in stop):
            raise DataError(f"{os.path.join(path, GENERATION_CONFIG)}: eos_token_id must be an int or a "
                             f"list of ints, got {stop!r}")
        eos = [ids["eos_token"]] if "eos_token" in ids else []
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos + stop))
        self.eos_id: int = self.eos_ids[0] if self.eos_ids else -1
        self.bos_id: int = ids.get("bos_token", -1)
        self.pad_id: int = next(i for i in (ids.get("pad_token", -1), self.eos_id, 0) if i >= 0)
        # Every id is below vocab_size (added tokens included), as the sampler and model need.
        self.vocab_size: int = 1 + max(self._tok.get_vocab(with_added_tokens=True).values())
        # Templates see the special tokens as strings, under their names (bos_token, ...).
        self._template_vars = {name: t.content for name, t in special.items()}
        self.chat_templates, self._template_file = read_templates(path, config)
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def has_chat_template(self) -> bool:
        return "default" in self.chat_templates

    def save(self, directory: str):
        """Copies the tokenizer's files (`HF_FILES` that exist) to `directory`."""
        os.makedirs(directory, exist_ok=True)
        for name in HF_FILES:
            source, out = os.path.join(self.path, name), os.path.join(directory, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(out):
                shutil.copyfile(source, out)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS; special-token strings in text become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (in parallel in Rust, without computing offsets)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping special tokens (bos, eos, pad, turn markers)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_of(self, token: str) -> int:
        """Id of a vocabulary token as tokenizer.json spells it ("<|eot_id|>", "Ġthe").

        Raises KeyError if the token is not in the vocabulary.
        """
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} not in vocabulary of {self.path}")
        return i

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    tools: Sequence[dict] | None = None, **kwargs) -> str:
        """The chat template's text, as transformers' apply_chat_template(..., tokenize=False).

        messages: [{'role': str, 'content': str, ...}] of plain JSON values; as
        in transformers, keys whose value is None are dropped, and a message's
        reasoning ("reasoning_content", "thinking" or "reasoning") is passed as
        both "reasoning_content" and "thinking". tools: JSON schemas (dicts),
        which select a "tool_use" template when the directory has one.
        kwargs: more template variables (e.g. enable_thinking=False for Qwen3).
        ValueError names the template file when there is none or it raises.
        """
        if not messages:
            raise ValueError("messages: empty conversation")
        return self._render(messages, add_generation_prompt, tools, kwargs)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tools: Sequence[dict] | None = None, **kwargs) -> list[int]:
        """The rendered chat's ids: transformers' apply_chat_template(..., tokenize=True) input_ids.

        The template writes any BOS itself, so no special token is added.
        Arguments as in `render_chat`.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, **kwargs))

    def assistant_spans(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                        **kwargs) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, spans): the conversation's ids and each assistant message's [start, end) in them.

        ids equal apply_chat_template(messages). A span is what the model
        generates for that turn, so an SFT loss mask: from the end of the
        generation prompt to the turn's first stop token (one of eos_ids),
        inclusive. It is found from the rendered template, with two
        assumptions, each a ValueError when it fails:
        - the chat before the turn, rendered with add_generation_prompt, is a
          prefix of the whole rendered chat: later messages do not change how
          earlier ones render. True of the Llama 3 and Gemma 3 templates, and
          of Qwen3's unless an earlier turn carries reasoning (dropped once a
          later user message follows) or enable_thinking=False (its
          generation prompt has an empty think block that earlier turns lack);
        - the turn ends with a stop token before the next assistant turn starts
          (sampling from the generation prompt stops there). A stop-token
          string inside an assistant's content would end its span early.
        A token straddling the start belongs to the span, as in transformers'
        assistant masks.
        """
        text = self.render_chat(messages, False, tools, **kwargs)
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids, ends = encoding.ids, [end for _, end in encoding.offsets]
        stops, spans = set(self.eos_ids), []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self._render(messages[:i], True, tools, kwargs)
            if not text.startswith(prefix):
                k = len(os.path.commonprefix([prefix, text]))
                raise ValueError(f"{self._template_file}: the chat before message {i} with the generation "
                                 f"prompt is not a prefix of the whole chat, so assistant turn {i} cannot be "
                                 f"located: at character {k}, {prefix[k:k + 40]!r} vs {text[k:k + 40]!r}")
            start = bisect.bisect_right(ends, len(prefix))  # the first token that ends past the prefix
            end = next((j + 1 for j in range(start, len(ids)) if ids[j] in stops), None)
            if end is None or spans and spans[-1][1] > start:
                which = i if end is None else f"before {i}"
                raise ValueError(f"{self._template_file}: assistant message {which} does not end with a stop "
                                 f"token {self.eos_ids} (eos_token, generation_config.json's eos_token_id)")
            spans.append((start, end))
        return ids, spans

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool,
                tools: Sequence[dict] | None, kwargs: dict) -> str:
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise DataError(f"{self.path}: no chat template {name!r} (looked for {CHAT_TEMPLATE} and "
                             f"{TOKENIZER_CONFIG}'s chat_template; found {sorted(self.chat_templates)})")
        if name not in self._compiled:
            self._compiled[name] = compile_template(self.chat_templates[name], f"{self._template_file} ({name})")
        try:
            return self._compiled[name].render(
                    messages=[plain_message(m) for m in messages], tools=tools, documents=None,
                    add_generation_prompt=add_generation_prompt, **{**self._template_vars, **kwargs})
        except jinja2.TemplateError as e:
            raise DataError(f"{self._template_file} ({name}): chat template raised: {e}") from e

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _read_json(file: str) -> dict:
    """A JSON object file of the tokenizer directory; {} when absent (each is optional)."""
    return read_json_object(file) if os.path.isfile(file) else {}


def _special_tokens(config: dict, legacy: dict) -> dict[str, tokenizers.AddedToken]:
    """Named special tokens ("bos_token", "eos_token", any "*_token") -> AddedToken.

    Values are strings or AddedToken dicts ({"content": ..., "lstrip": ...}).
    tokenizer_config.json wins, then its "extra_special_tokens" dict, then
    special_tokens_map.json (older saves) for names the others lack.
    """
    out = {}
    extra = config.get("extra_special_tokens")
    for source in (legacy, extra if isinstance(extra, dict) else {}, config):
        for name, value in source.items():
            if not name.endswith("_token"):
                continue
            if isinstance(value, str):
                out[name] = tokenizers.AddedToken(value, special=True)
            elif isinstance(value, dict) and isinstance(value.get("content"), str):
                flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if k in value}
                out[name] = tokenizers.AddedToken(value["content"], special=True, **flags)
    return out
