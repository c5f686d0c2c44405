"""Tests for ptx.tokenizer: exact round trips, determinism, template, ids."""
import pytest

from ptx.tokenizer import PromptTemplate, Tokenizer, load_tokenizer, train_tokenizer

TEMPLATE = PromptTemplate()


def corpus() -> list[str]:
    texts = []
    for i in range(300):
        texts.append(TEMPLATE.format_prompt(f"What is {i} plus {2 * i}?  Explain, briefly.")
                     + TEMPLATE.format_completion(f"It is {3 * i}. Indeed:\n  x = [{i}, {i}]"))
        texts.append(f"The quick brown fox {i} jumps over the lazy dog.\n\tTabs and  spaces.")
    return texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=400,
                           path=str(tmp_path_factory.mktemp("tok") / "t.model"))


TRICKY = [
    "",
    " ",
    "\n",
    "  two leading spaces and two trailing  ",
    "line one\nline two\n\nafter a blank line\n",
    "double  spaces,   triple;\ttab\r\nwindows newline",
    "digits 0123456789 and 3.14159e-10 and -42",
    "punctuation !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "unseen: naïve café 日本語 😀 \u00a0nbsp \u200bzero-width Ωmega",
    "\n\nHuman: hi\n\nAssistant: hello\n\nHuman:",
]


@pytest.mark.parametrize("text", TRICKY)
def test_decode_encode_round_trips_tricky_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_for_unigram_model(tmp_path):
    uni = train_tokenizer(corpus(), vocab_size=400, path=str(tmp_path / "u.model"),
                          model_type="unigram")
    for text in TRICKY:
        assert uni.decode(uni.encode(text)) == text


def test_separately_encoded_prompt_and_completion_decode_to_their_concatenation(tok):
    prompt = TEMPLATE.format_prompt("Add 2 and 2.")
    completion = TEMPLATE.format_completion("4")
    ids = tok.encode(prompt) + tok.encode(completion)
    assert tok.decode(ids) == prompt + completion == "\n\nHuman: Add 2 and 2.\n\nAssistant: 4"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_training_twice_gives_identical_model_bytes_and_ids(tmp_path):
    a = train_tokenizer(corpus(), vocab_size=400, path=str(tmp_path / "a.model"))
    b = train_tokenizer(iter(corpus()), vocab_size=400, path=str(tmp_path / "b.model"))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    for text in TRICKY + corpus()[:20]:
        assert a.encode(text) == b.encode(text)


def test_special_ids_are_fixed_and_vocab_within_request(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.eos_ids == (tok.eos_id,)
    assert 256 + 4 < tok.vocab_size <= 400  # byte pieces + specials + merges


def test_decode_ignores_pad_bos_eos(tok):
    ids = tok.encode("hello world")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "hello world"


def test_turn_markers_are_single_tokens(tok):
    human, assistant = TEMPLATE.special_strings()
    assert (human, assistant) == ("\n\nHuman:", "\n\nAssistant:")
    assert tok.encode(human) == [tok.id_of(human)]
    assert tok.encode(assistant) == [tok.id_of(assistant)]
    # The prefix's trailing space joins the next word instead of being a token of its own.
    assert tok.encode(TEMPLATE.format_prompt("x"))[0] == tok.id_of(human)


def test_digits_are_split_one_per_token(tok):
    ids = tok.encode("1234567")
    assert len(ids) == 7


def test_id_of_unknown_piece_raises(tok):
    with pytest.raises(KeyError, match="no-such-piece"):
        tok.id_of("no-such-piece")


def test_load_gives_same_tokenizer_and_missing_path_is_named(tok, tmp_path):
    loaded = load_tokenizer(tok.path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TRICKY[4]) == tok.encode(TRICKY[4])
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(missing)


def test_template_formats_prompt_and_completion():
    assert TEMPLATE.format_prompt("Hi?") == "\n\nHuman: Hi?\n\nAssistant:"
    assert TEMPLATE.format_completion("  Hello.\n") == " Hello."
    custom = PromptTemplate(user_prefix="<u>", assistant_prefix="<a>")
    assert custom.format_prompt("q") == "<u>q<a>"


def test_messages_to_pair_renders_history_and_splits_last_reply():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 "},
    ]
    prompt, completion = TEMPLATE.messages_to_pair(messages)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"
    assert completion == " 4"
    one_turn = TEMPLATE.messages_to_pair(messages[:2])
    assert one_turn == (TEMPLATE.format_prompt("Hi"), TEMPLATE.format_completion("Hello!"))


def test_messages_to_pair_requires_final_assistant_turn():
    with pytest.raises(ValueError, match="last message must have role 'assistant'"):
        TEMPLATE.messages_to_pair([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="empty"):
        TEMPLATE.messages_to_pair([])
