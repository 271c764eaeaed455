import gzip
import json

import pytest
import torch

from conftest import HH, HH_PROMPT, TLDR, TLDR_PROMPT
from nanorlhf import checkpoint
from nanorlhf.config import UserError
from nanorlhf.data import (encode_lm_data, load_demonstrations, load_preferences, load_prompts, load_rankings,
                           load_sft, write_jsonl)
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.sft import make_batch, sft_loss
from nanorlhf.tokenizer import EOT, encode


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

    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save(tmp_path / "rm.pt", model, kind="rm", step=3, resume={})
    with pytest.raises(UserError, match=r"stopped at step 3 before it finished: complete it with `python train_rm.py "
                                        r"--resume`"):
        checkpoint.load(tmp_path / "rm.pt", made_by="train_rm.py", kind="rm")
    assert checkpoint.load(tmp_path / "rm.pt", made_by="train_rm.py", kind="rm", finished=False)["step"] == 3


E = "<|endoftext|>"

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_hh_pairs_split_at_the_last_assistant_turn(tmp_path):
    write_jsonl(tmp_path / "hh.jsonl", [HH])
    assert load_preferences(tmp_path / "hh.jsonl") == [(HH_PROMPT, [" It is 4." + E, " Why do you ask?" + E])]


def test_hh_demonstrations_use_the_chosen_reply(tmp_path):
    write_jsonl(tmp_path / "hh.jsonl", [HH, {"chosen": "\n\nHuman: Yo\n\nAssistant: Hey" + E}])
    assert load_demonstrations(tmp_path / "hh.jsonl") == [(HH_PROMPT, " It is 4." + E),
                                                          ("\n\nHuman: Yo\n\nAssistant:", " Hey" + E)]


def test_tldr_comparisons_put_the_chosen_summary_first(tmp_path):
    three = dict(TLDR, info={"post": "p"}, summaries=[{"text": " a"}, {"text": " b"}, {"text": " c"}], choice=2)
    write_jsonl(tmp_path / "c.jsonl", [TLDR, three])
    assert load_preferences(tmp_path / "c.jsonl") == [
        (TLDR_PROMPT, [" my cat ignores me, help" + E, " cat is aloof" + E]),
        ("POST: p\nTL;DR:", [" c" + E, " a" + E]),  # only the best is known: K - 1 pairs, no invented order
        ("POST: p\nTL;DR:", [" c" + E, " b" + E]),
    ]


def test_tldr_demonstrations_nested_and_flat(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"info": TLDR["info"], "summary": "cat is aloof"},
                                       {"info": {"post": "x", "subreddit": "r/AskReddit"}, "summary": {"text": " y"}}])
    assert load_demonstrations(tmp_path / "d.jsonl") == [(TLDR_PROMPT, " cat is aloof" + E),
                                                         ("SUBREDDIT: r/AskReddit\nPOST: x\nTL;DR:", " y" + E)]
    write_jsonl(tmp_path / "flat.jsonl", [{"id": "1", "subreddit": "cats", "title": "Cat trouble",
                                           "post": "My cat ignores me.", "summary": " aloof cat"}])
    assert load_demonstrations(tmp_path / "flat.jsonl") == [(TLDR_PROMPT, " aloof cat" + E)]


def test_our_own_formats_pass_through(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert load_preferences(tmp_path / "r.jsonl") == [("p", ["a" + E, "b" + E, "c" + E])]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load_preferences(tmp_path / "pairs.jsonl") == [("p", ["a" + E, "b" + E])]
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": " r"}])
    assert load_demonstrations(tmp_path / "sft.jsonl") == [("p", " r" + E)]


BAD_PREFERENCES = [
    ([dict(HH, rejected="\n\nHuman: Bye\n\nAssistant: ok")], "x.jsonl: no pair left"),
    ([dict(HH, chosen="\n\nHuman: no reply here")], "x.jsonl:1: field 'chosen': no '\\n\\nAssistant:' turn"),
    ([HH, {"chosen": HH["chosen"]}], "x.jsonl:2: missing field 'rejected'"),
    ([TLDR, dict(TLDR, choice=2)], "x.jsonl:2: field 'choice' is 2"),
    ([dict(TLDR, info={"article": "cnn", "site": "cnn"})], "x.jsonl: every record is a CNN/DM article"),
    ([TLDR, dict(TLDR, info={"title": "t", "site": "cnn"})], "x.jsonl:2: field 'info.post' is missing"),
    ([dict(TLDR, summaries=[{"text": "a"}, {"txt": "b"}])], "x.jsonl:1: field 'summaries[1].text'"),
    ([dict(TLDR, summaries=[{"text": "a"}])], "x.jsonl:1: field 'summaries' must hold at least 2"),
    ([TLDR, dict(TLDR, choice="1")], "x.jsonl:2: field 'choice' must be int"),
    ([dict(TLDR, info=dict(TLDR["info"], title=7))], "x.jsonl:1: field 'info.title' must be a string"),
    ([{"question": "q", "answer": "a"}], "unknown format (the first record has fields ['answer', 'question'])"),
]


@pytest.mark.parametrize("records,message", BAD_PREFERENCES)
def test_bad_preference_records_name_file_line_and_field(tmp_path, records, message):
    write_jsonl(tmp_path / "x.jsonl", records)
    with pytest.raises(UserError) as e:
        load_preferences(tmp_path / "x.jsonl")
    assert message in str(e.value) and "\n" not in str(e.value).replace("\\n", "")


@pytest.mark.parametrize("records,message", [
    ([{"info": {"title": "t"}, "summary": "s"}], "x.jsonl:1: field 'info.post' is missing"),
    ([{"post": "p", "summary": 3}], "x.jsonl:1: field 'summary' must be a string"),
    ([HH, {"rejected": "x"}], "x.jsonl:2: missing field 'chosen'"),
    ([{"prompt": "p", "completion": "c"}], "unknown format"),
])
def test_bad_demonstration_records(tmp_path, records, message):
    write_jsonl(tmp_path / "x.jsonl", records)
    with pytest.raises(UserError) as e:
        load_demonstrations(tmp_path / "x.jsonl")
    assert message in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    write_lines(tmp_path / "x.jsonl", [json.dumps(HH), '{"chosen": '])
    with pytest.raises(UserError, match="x.jsonl:2: not valid JSON"):
        load_preferences(tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="no such file"):
        load_demonstrations(tmp_path / "nope.jsonl")


GOOD = b'{"prompt": "a", "response": " b", "responses": [" b", " c"]}\n'  # a record every loader below takes


@pytest.mark.parametrize("name,content,message", [
    ("x.jsonl", GOOD + b'\n{"prompt": "caf\xe9"}\n', "x.jsonl:3: not UTF-8 text (byte 0xe9 at column 16)"),
    ("x.jsonl.gz", GOOD, "x.jsonl.gz: not gzip data"),
    ("x.jsonl.gz", gzip.compress(GOOD + b'{"prompt": "\xff"}\n'), "x.jsonl.gz:2: not UTF-8 text"),
    ("x.jsonl.gz", gzip.compress(GOOD * 5000)[:200], "the gzip data is cut off or corrupt"),
    ("x.jsonl", None, "x.jsonl: is a directory"),
], ids=["not-utf8", "not-gzip", "not-utf8-in-gzip", "gzip-cut-off", "a-directory"])
def test_unreadable_files_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for load in (load_prompts, load_demonstrations, load_preferences):
        with pytest.raises(UserError) as e:
            load(path)
        assert message in str(e.value) and "\n" not in str(e.value), load


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = write_bytes(tmp_path / "x.jsonl", b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b"}\r\n')
    assert load_prompts(path) == ["a", "b"]


def test_lines_are_counted_with_blank_lines(tmp_path):
    path = write(tmp_path / "sft.jsonl", '\n{"prompt": "a", "response": " b"}\n\n\n{"prompt": "c", "response": " d"}\n')
    assert load_demonstrations(path, with_lines=True) == [("a", " b" + E, 2), ("c", " d" + E, 5)]
    write_jsonl(tmp_path / "hh.jsonl", [HH])
    assert load_demonstrations(tmp_path / "hh.jsonl", with_lines=True) == [(HH_PROMPT, " It is 4." + E, 1)]
    path = write(tmp_path / "u.jsonl", '\n\n{"text": "a"}\n')
    with pytest.raises(UserError, match=r"u.jsonl:3: unknown format"):
        load_prompts(path)


def test_an_empty_prompt_is_refused_where_prompts_are_read(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": ""}\n')
    with pytest.raises(UserError) as e:
        load_prompts(path)
    assert str(e.value) == f"{path}:3: field 'prompt' is empty (a prompt needs at least one token)"


def write_bytes(path, data):
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------------------------
# The real files' quirks (issue 15): HH pairs that part before their last Assistant turn, TL;DR's CNN/DM records

HH_EARLY = {  # the dialogues part at the first reply, and go on differently: split where they part
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Rude!\n\nAssistant: Sorry.",
}
HH_APART = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",  # no Assistant turn shared: skipped
            "rejected": "\n\nHuman: Yo\n\nAssistant: Hey"}
CNNDM = [  # the comparisons' news records: as the released JSON has them, and as the Hugging Face copy (nulls)
    dict(TLDR, info={"id": "dm1", "article": "A cat was found.", "site": "dailymail"}, batch="cnndm1"),
    dict(TLDR, info={"id": "cnn2", "post": None, "title": None, "subreddit": None, "site": "cnn",
                     "article": "Rain fell."}, batch="cnndm3"),
]


def test_hh_pairs_that_part_early_are_split_where_they_part_or_skipped_with_a_count(tmp_path, capsys):
    write_jsonl(tmp_path / "hh.jsonl", [HH, HH_EARLY, HH_APART, HH])
    assert load_preferences(tmp_path / "hh.jsonl") == [
        (HH_PROMPT, [" It is 4." + E, " Why do you ask?" + E]),
        ("\n\nHuman: Hi\n\nAssistant:", [" Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4." + E,
                                          " Go away.\n\nHuman: Rude!\n\nAssistant: Sorry." + E]),
        (HH_PROMPT, [" It is 4." + E, " Why do you ask?" + E]),
    ]
    assert capsys.readouterr().out == (f"note: {tmp_path / 'hh.jsonl'}: 2 of 4 pairs differ before their last "
                                       f"Assistant turn: 1 split at the last Assistant turn they share, 1 skipped "
                                       f"(they share none)\n")


def test_tldr_cnn_dm_records_are_skipped_with_a_count_or_kept_as_article_prompts(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", [CNNDM[0], TLDR, CNNDM[1]])
    pair = [" my cat ignores me, help" + E, " cat is aloof" + E]
    assert load_preferences(tmp_path / "c.jsonl") == [(TLDR_PROMPT, pair)]
    assert load_prompts(tmp_path / "c.jsonl") == [TLDR_PROMPT]
    note = (f"note: {tmp_path / 'c.jsonl'}: 2 of 3 records are CNN/DM news (an 'article', no 'post'): skipped "
            f"(--keep_articles keeps them as article prompts)\n")
    assert capsys.readouterr().out == note * 2
    articles = ["ARTICLE: A cat was found.\nTL;DR:", TLDR_PROMPT, "ARTICLE: Rain fell.\nTL;DR:"]
    assert load_preferences(tmp_path / "c.jsonl", articles=True) == [(a, pair) for a in articles]
    assert load_prompts(tmp_path / "c.jsonl", articles=True) == articles
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------------------------
# PPO-ptx's data: plain text (the LM loss on every token) or demonstrations (on the response)

TEXT = "The cat sat on the mat. <|endoftext|> is just text here.\nA second line.\n"


def test_plain_text_is_cut_into_windows_whose_every_token_is_a_target(tmp_path):
    (tmp_path / "p.txt").write_text(TEXT)
    ids = encode(TEXT)
    assert EOT not in ids and len(ids) == 25  # user text never encodes the end token
    examples = encode_lm_data(tmp_path / "p.txt", block_size=8)
    assert examples == [(ids[0:8], 7), (ids[8:16], 7), (ids[16:24], 7)]  # the last token alone: nothing to predict
    write_jsonl(tmp_path / "t.jsonl", [{"text": TEXT}, {"text": "A"}, {"text": "Hi there"}])  # "A": nothing to predict
    assert encode_lm_data(tmp_path / "t.jsonl", 8) == examples + [(encode("Hi there"), 1)]
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress(TEXT.encode()))
    assert encode_lm_data(tmp_path / "p.txt.gz", 8) == examples


def test_the_lm_loss_on_plain_text_is_the_mean_over_every_next_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    examples = [(encode(TEXT)[0:8], 7), (encode(TEXT)[16:21], 4)]
    loss, n = sft_loss(model, *make_batch(examples, "cpu"))
    nll = []
    for toks, _ in examples:
        logp = torch.log_softmax(model.lm_logits(model(torch.tensor([toks])))[0], -1)  # (T, V)
        nll += [-logp[t - 1, toks[t]] for t in range(1, len(toks))]  # every token but the first
    assert n == 11
    torch.testing.assert_close(loss, torch.stack(nll).mean())


def test_demonstrations_still_work_as_lm_data(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Sort: 2 1\nAnswer:", "response": " 1 2"}])
    (toks, n), = encode_lm_data(tmp_path / "d.jsonl", 48)
    assert n == 3 and toks[-3:] == encode(" 1 2") + [EOT]
    write_jsonl(tmp_path / "hh.jsonl", [HH])
    assert encode_lm_data(tmp_path / "hh.jsonl", 48)[0][1] == len(encode(" It is 4.")) + 1
    assert encode_lm_data(tmp_path / "d.jsonl", 48, text=False) == [(toks, n)]


@pytest.mark.parametrize("name,content,message", [
    ("x.txt", b"", "x.txt: no text of 2 tokens or more"),
    ("x.txt", b"ok\n\xff\n", "x.txt:2: not UTF-8 text"),
    ("x.jsonl", b'{"text": "ok ok"}\n{"text": 3}\n', "x.jsonl:2: field 'text' must be str"),
    ("x.jsonl", b'{"text": "A"}\n', "x.jsonl: no text of 2 tokens or more"),
    ("x.jsonl", b'{"prompt": "a", "response": " b"}\n{"prompt": "a", "response": "' + b" 1" * 60 + b'"}\n',
     "x.jsonl:2: the response alone is longer than the context (block_size 48 tokens)"),
])
def test_bad_lm_data_is_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        encode_lm_data(tmp_path / name, 48)
    assert message in str(e.value) and "\n" not in str(e.value)
