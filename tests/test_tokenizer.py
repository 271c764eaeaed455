import pytest

from nanorlhf import tokenizer
from nanorlhf.data import load_sft, write_jsonl
from nanorlhf.sft import encode_example
from nanorlhf.tokenizer import END, EOT, PAD, decode, encode, encode_response


def test_gpt2_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode_response("<|endoftext|>") == [EOT] == [50256]
    assert encode(" 1 3 4 9") == [352, 513, 604, 860]  # one token per number: the task's answers
    assert PAD != EOT


@pytest.mark.parametrize("text", ["Hello world", "Sort: 3 9 1 4\nAnswer: 1 3 4 9<|endoftext|>",
                                  "naïve café — ünïcödé 🙂", "  spaces\n\n\ttabs  ", "it's we'll they've"])
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_local_file_builds_the_same_encoding():
    path = tokenizer.ranks_path()
    if not path.exists():
        pytest.skip(f"{path} missing (make setup fetches it)")
    enc = tokenizer.encoding_from_file(path)
    assert enc.n_vocab == 50257
    text = "The quick brown fox: 12345 jumps!\n<|endoftext|>"
    assert enc.encode(text, allowed_special="all") == encode_response(text)


def test_missing_file_offline_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("NANORLHF_TIKTOKEN", str(tmp_path / "nope.tiktoken"))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="make setup"):
            tokenizer.get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()


def test_end_written_in_user_text_is_ordinary_text(tmp_path):
    # Only the end that the loader (or the sampler) adds is the end token; the same characters inside a prompt or
    # a response are text, so a user's data cannot end a sequence early.
    assert EOT not in encode("Say <|endoftext|> twice: <|endoftext|>")
    assert decode(encode("a <|endoftext|> b")) == "a <|endoftext|> b"
    inner = encode_response(f"x {END} y")  # no end added: the text as it is
    assert EOT not in inner and decode(inner) == f"x {END} y"
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q {END}:", "response": f" a {END} b"}])
    (prompt, response), = load_sft(tmp_path / "sft.jsonl")  # the loader adds the end
    tokens, n = encode_example(prompt, response, 64)
    assert tokens.count(EOT) == 1 and tokens[-1] == EOT and n == len(encode(f" a {END} b")) + 1
