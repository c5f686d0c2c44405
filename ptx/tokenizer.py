"""SentencePiece tokenizer (train / load) and the Human/Assistant prompt template.

Text conventions, shared by every stage so that a prompt formatted for SFT is
the same prompt the sampler and the reward model see:

    prompt     = "\\n\\nHuman: " + user text + "\\n\\nAssistant:"
    completion = " " + assistant text, stripped of surrounding whitespace

A training sequence is `[bos] + encode(prompt) + encode(completion) + [eos]`:
prompt and completion are encoded separately, and the tokenizer is trained
without a dummy prefix, so `decode(encode(a) + encode(b)) == a + b` and the
prompt/completion boundary is always a token boundary.
"""
import dataclasses
import io
import os
import uuid
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a .model file; FileNotFoundError names the path if absent."""
    return Tokenizer(path)


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
