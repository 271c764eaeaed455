import pytest

from nanorlhf import checkpoint
from nanorlhf.config import UserError
from nanorlhf.data import load_prompts, load_rankings, load_sft, write_jsonl


def write(path, text):
    path.write_text(text)
    return path


def test_sft_and_end_token(tmp_path):
    p = write(tmp_path / "sft.jsonl", '{"prompt": "a", "response": " b"}\n\n{"prompt": "c", "response": " d<|endoftext|>"}\n')
    assert load_sft(p) == [("a", " b<|endoftext|>"), ("c", " d<|endoftext|>")]


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a", "response": " b"}\n{"prompt": "a"}\n', "sft.jsonl:2: missing field 'response'"),
    ('{"prompt": "a", "response": " b"}\n{"prompt": "a", "response": \n', "sft.jsonl:2: not valid JSON"),
    ('{"prompt": 3, "response": " b"}\n', "sft.jsonl:1: field 'prompt' must be str, got int"),
    ('["a", "b"]\n', "sft.jsonl:1: expected a JSON object"),
    ('\n', "sft.jsonl: no records"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, text, message):
    p = write(tmp_path / "sft.jsonl", text)
    with pytest.raises(UserError) as e:
        load_sft(p)
    assert message in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_prompts(tmp_path / "nope.jsonl")


def test_rankings_and_pairs(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert load_rankings(tmp_path / "r.jsonl") == [("p", ["a<|endoftext|>", "b<|endoftext|>", "c<|endoftext|>"])]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load_rankings(tmp_path / "pairs.jsonl") == [("p", ["a<|endoftext|>", "b<|endoftext|>"])]
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a"]}])
    with pytest.raises(UserError, match="bad.jsonl:2: field 'responses' must be a list of at least 2"):
        load_rankings(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "badpair.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(UserError, match="badpair.jsonl:1: missing field 'rejected'"):
        load_rankings(tmp_path / "badpair.jsonl")


def test_missing_checkpoint_names_the_script(tmp_path):
    with pytest.raises(UserError, match="run `python train_sft.py` first"):
        checkpoint.load(tmp_path / "sft.pt", made_by="train_sft.py")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        checkpoint.load(tmp_path / "junk.pt", made_by="train_sft.py")


def test_a_mid_run_checkpoint_is_refused_downstream(tmp_path):
    from nanorlhf.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save(tmp_path / "rm.pt", model, kind="rm", step=3, resume={})
    with pytest.raises(UserError, match=r"stopped at step 3 before it finished: complete it with `python train_rm.py "
                                        r"--resume`"):
        checkpoint.load(tmp_path / "rm.pt", made_by="train_rm.py", kind="rm")
    assert checkpoint.load(tmp_path / "rm.pt", made_by="train_rm.py", kind="rm", finished=False)["step"] == 3
