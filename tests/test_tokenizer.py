import pytest

from nanorlhf import tokenizer
from nanorlhf.tokenizer import EOT, PAD, decode, encode


def test_gpt2_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode("<|endoftext|>") == [EOT] == [50256]
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
    assert enc.encode(text, allowed_special="all") == encode(text)


def test_missing_file_offline_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("NANORLHF_TIKTOKEN", str(tmp_path / "nope.tiktoken"))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="make setup"):
            tokenizer.get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()
