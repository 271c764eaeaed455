"""Data files: our JSONL formats and the public ones (HH-RLHF, TL;DR), told apart by their first record, read
into nanorlhf's own forms with one-line errors (`error: FILE:LINE: ...` naming the field, never a traceback).

What the training scripts get, whatever the file looks like:
    demonstrations  [(prompt, response)]          load_demonstrations (with_lines: [(prompt, response, line)])
    preferences     [(prompt, [response, ...])]   load_preferences: best first, K >= 2
    prompts         [prompt]                      load_prompts: each distinct prompt once, from a file in any format
    LM examples     [(tokens, n_targets)]         encode_lm_data: demonstrations, or plain text (PPO-ptx)
Every response ends with "<|endoftext|>" (added when missing). A file that cannot be read as UTF-8 JSONL (a
directory, bytes that are not UTF-8, a .gz file that is not gzip) is a one-line error too; lines are counted from 1,
blank lines included, so FILE:LINE is the line an editor shows.

Formats (JSONL, one record a line, UTF-8; a .gz file is read as gzip):

  ours         demonstrations {"prompt", "response"}; rankings {"prompt", "responses": [best first]};
               pairs {"prompt", "chosen", "rejected"} (a ranking of K = 2); prompts {"prompt"}
  HH-RLHF      {"chosen": transcript, "rejected": transcript}   (Anthropic's helpful/harmless data, Bai et al. 2022)
               A transcript is "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: ..."; the two
               mostly differ only in the last Assistant turn. The prompt is everything up to and including the last
               "\n\nAssistant:", the response is what follows it. A pair that differs earlier (real files hold
               some) is split at the last "\n\nAssistant:" both share, or skipped if they share none; counted.
  TL;DR        comparisons {"info": {"post", "title"?, "subreddit"?}, "summaries": [{"text"}, ...], "choice": i}
               (OpenAI's summarize-from-feedback, Stiennon et al. 2020), and demonstrations {"info", "summary"} or
               the flat {"post", "title"?, "subreddit"?, "summary"} of the filtered TL;DR set. The prompt is
                   SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:
               (lines without a value are left out) and a summary gets a leading space if it has none, so it reads
               "TL;DR: summary" as GPT-2 tokenizes it. The comparisons' CNN/DM records (news: "article", no "post")
               are skipped with a count, or kept (articles=True) as "ARTICLE: {article}\nTL;DR:" prompts.
  plain text   PPO-ptx's pretraining data (InstructGPT eq. 2): a .txt file, or JSONL {"text"}; the LM loss is on
               every token, in windows of block_size tokens.
"""

import contextlib
import gzip
import json
import os
import zlib
from pathlib import Path

from nanorlhf.config import UserError
from nanorlhf.dist import print0
from nanorlhf.sft import encode_example
from nanorlhf.tokenizer import encode

END = "<|endoftext|>"


def write_jsonl(path, records) -> None:
    """Write records one JSON object per line, atomically (a temporary file renamed into place)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_text(path, text: str) -> None:
    """Write a text file atomically: a temporary file beside it, renamed into place; a failure is one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None


def open_binary(path):
    """Open a file for reading bytes; a .gz file (as HH-RLHF ships) is decompressed on the fly."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def text_lines(path):
    """(line number, line) of a UTF-8 text file (a .gz one decompressed); a file that cannot be read, or a line
    that is not UTF-8, is a one-line UserError (a UTF-8 byte-order mark at the start is allowed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a {'text' if '.txt' in path.name else 'JSONL'} file")
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1})") from None
    except gzip.BadGzipFile as e:
        if lineno == 0:
            raise UserError(f"{path}: not gzip data (a file whose name ends in .gz is read as gzip)") from None
        raise UserError(f"{path}:{lineno + 1}: the gzip data is corrupt ({e})") from None
    except (EOFError, zlib.error) as e:  # a .gz file cut off, or damaged
        raise UserError(f"{path}:{lineno + 1}: the gzip data is cut off or corrupt ({e})") from None
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def json_lines(path):
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a one-line UserError.

    Read as bytes and decoded line by line, so a line that is not UTF-8 is named (text_lines)."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(r, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
        yield lineno, r


def read_jsonl(path, fields: dict) -> list[dict]:
    """Records of a JSONL file, each checked to have `fields` ({name: type}); blank lines are skipped."""
    records = []
    for lineno, r in json_lines(path):
        for name, kind in fields.items():
            if name not in r:
                raise UserError(f"{path}:{lineno}: missing field '{name}'")
            if not isinstance(r[name], kind):
                raise UserError(f"{path}:{lineno}: field '{name}' must be {kind.__name__}, "
                                f"got {type(r[name]).__name__}")
        r["_line"] = lineno
        records.append(r)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def with_end(response: str) -> str:
    return response if response.endswith(END) else response + END


def lines_or_not(triples, with_lines: bool):
    """[(prompt, response, line)] as they are, or without the line numbers."""
    return triples if with_lines else [(p, r) for p, r, _ in triples]


def load_sft(path, with_lines=False) -> list[tuple[str, str]]:
    """[(prompt, response)] from SFT demonstrations; with_lines: [(prompt, response, line number)]."""
    return lines_or_not([(r["prompt"], with_end(r["response"]), r["_line"])
                         for r in read_jsonl(path, {"prompt": str, "response": str})], with_lines)


def load_rankings(path) -> list[tuple[str, list[str]]]:
    """[(prompt, responses best first)] from a rankings file or a pairwise file (a pair is a ranking of K = 2)."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "chosen" in first:
        recs = read_jsonl(path, {"prompt": str, "chosen": str, "rejected": str})
        return [(r["prompt"], [with_end(r["chosen"]), with_end(r["rejected"])]) for r in recs]
    recs = read_jsonl(path, {"prompt": str, "responses": list})
    out = []
    for r in recs:
        if len(r["responses"]) < 2 or not all(isinstance(x, str) for x in r["responses"]):
            raise UserError(f"{path}:{r['_line']}: field 'responses' must be a list of at least 2 strings")
        out.append((r["prompt"], [with_end(x) for x in r["responses"]]))
    return out


def load_choices(path) -> list[tuple[str, list[str]]]:
    """[(prompt, responses with the chosen one first)] from best-of-K choices {"prompt", "responses", "best": i}
    (Ziegler et al. 2019's 4-way comparisons: the labeler picks the best of K). Only the first place is known; the
    order of the others means nothing (the RM's loss for them is reward.choice_loss, never the ranking loss)."""
    path = Path(path)
    out = []
    for r in read_jsonl(path, {"prompt": str, "responses": list, "best": int}):
        responses = r["responses"]
        if len(responses) < 2 or not all(isinstance(x, str) for x in responses):
            raise UserError(f"{path}:{r['_line']}: field 'responses' must be a list of at least 2 strings")
        if not 0 <= r["best"] < len(responses):
            raise UserError(f"{path}:{r['_line']}: field 'best' is {r['best']}, not an index into the "
                            f"{len(responses)} responses")
        rest = [x for j, x in enumerate(responses) if j != r["best"]]
        out.append((r["prompt"], [with_end(x) for x in [responses[r["best"]], *rest]]))
    return out


def preference_kind(path) -> str:
    """"choice" for best-of-K choices (only the best is known), "ranking" for every other preference format."""
    return "choice" if "best" in read_jsonl_first(path) else "ranking"


def read_jsonl_first(path) -> dict:
    """The first record of a JSONL file, unchecked (to tell formats apart), with its line number under "_line"."""
    for lineno, r in json_lines(path):
        return {**r, "_line": lineno}
    raise UserError(f"{path}: no records")


ASSISTANT = "\n\nAssistant:"


# ------------------------------------------------------------------------------------------------------------------
# HH-RLHF

def split_transcript(text: str, where: str) -> tuple[str, str]:
    """A dialogue -> (prompt up to and including the last "\\n\\nAssistant:", the reply after it)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise UserError(f"{where}: no '\\n\\nAssistant:' turn to split at")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def shared_turn(chosen: str, rejected: str) -> int:
    """Where two dialogues that differ before their last Assistant turn part: the end of the last "\\n\\nAssistant:"
    inside their longest common prefix, or -1 if they share none."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    return cut + len(ASSISTANT) if cut >= 0 else -1


def load_hh(path) -> list[tuple[str, list[str]]]:
    """[(prompt, [chosen, rejected])] from HH-RLHF records {"chosen", "rejected"}.

    Real HH files hold pairs whose dialogues differ before the last Assistant turn: each is split at the last
    Assistant turn both share (the responses then hold the rest of each dialogue), or skipped if they share none;
    both are counted in one note."""
    out, early, skipped = [], 0, 0
    for r in read_jsonl(path, {"chosen": str, "rejected": str}):
        where = f"{path}:{r['_line']}"
        prompt, chosen = split_transcript(r["chosen"], f"{where}: field 'chosen'")
        other, rejected = split_transcript(r["rejected"], f"{where}: field 'rejected'")
        if other != prompt:  # they differ before their last Assistant turn
            cut = shared_turn(r["chosen"], r["rejected"])
            if cut < 0:
                skipped += 1
                continue
            early += 1
            prompt, chosen, rejected = r["chosen"][:cut], r["chosen"][cut:], r["rejected"][cut:]
        out.append((prompt, [with_end(chosen), with_end(rejected)]))
    if early or skipped:
        print0(f"note: {path}: {early + skipped} of {len(out) + skipped} pairs differ before their last Assistant "
               f"turn: {early} split at the last Assistant turn they share, {skipped} skipped (they share none)")
    if not out:
        raise UserError(f"{path}: no pair left: the two dialogues of every pair share no Assistant turn")
    return out


def load_hh_demonstrations(path, with_lines=False) -> list[tuple[str, str]]:
    """[(prompt, response)] from HH-RLHF records, the chosen dialogue's last reply as the demonstration."""
    out = []
    for r in read_jsonl(path, {"chosen": str}):
        prompt, response = split_transcript(r["chosen"], f"{path}:{r['_line']}: field 'chosen'")
        out.append((prompt, with_end(response), r["_line"]))
    return lines_or_not(out, with_lines)


# ------------------------------------------------------------------------------------------------------------------
# TL;DR

def is_article(info: dict) -> bool:
    """A CNN/DM record of the TL;DR comparisons (news for the transfer test): an "article", no "post"."""
    return info.get("post") is None and isinstance(info.get("article"), str)


def tldr_prompt(info: dict, where: str, prefix: str) -> str:
    """The summarization prompt for a Reddit post: SUBREDDIT / TITLE / POST lines, then "TL;DR:" (a CNN/DM record:
    ARTICLE instead of POST).

    prefix names where info sits in the record ("info." or ""), for the error messages."""
    body = ("ARTICLE: " + info["article"]) if is_article(info) else info.get("post")
    if not isinstance(body, str):
        raise UserError(f"{where}: field '{prefix}post' is missing or not a string")
    lines = []
    subreddit, title = info.get("subreddit"), info.get("title")
    for name, value in (("subreddit", subreddit), ("title", title)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: field '{prefix}{name}' must be a string, got {type(value).__name__}")
    if subreddit:
        lines.append("SUBREDDIT: " + (subreddit if subreddit.startswith("r/") else "r/" + subreddit))
    if title:
        lines.append("TITLE: " + title)
    lines.append(body if is_article(info) else "POST: " + body)
    return "\n".join(lines) + "\nTL;DR:"


def without_articles(path, records: list[dict], articles: bool) -> list[dict]:
    """TL;DR records without the CNN/DM ones (unless articles), with a note that counts them."""
    if articles:
        return records
    kept = [r for r in records if not (isinstance(r.get("info"), dict) and is_article(r["info"]))]
    if len(kept) < len(records):
        print0(f"note: {path}: {len(records) - len(kept)} of {len(records)} records are CNN/DM news (an 'article', "
               f"no 'post'): skipped (--keep_articles keeps them as article prompts)")
    if not kept:
        raise UserError(f"{path}: every record is a CNN/DM article (no 'post'): --keep_articles keeps them")
    return kept


def tldr_summary(text: str) -> str:
    """A summary as the response to "...TL;DR:": a leading space (GPT-2 tokens carry it), then the end token."""
    return with_end(text if text[:1].isspace() else " " + text)


def load_tldr(path, articles=False) -> list[tuple[str, list[str]]]:
    """Comparisons {"info", "summaries", "choice"} -> [(prompt, [chosen, other])]; the CNN/DM ones only if articles.

    Only the best summary is known, so K > 2 summaries give K - 1 pairs (chosen, other), never an invented order.
    """
    out = []
    for r in without_articles(path, read_jsonl(path, {"info": dict, "summaries": list, "choice": int}), articles):
        where = f"{path}:{r['_line']}"
        prompt = tldr_prompt(r["info"], where, "info.")
        summaries = r["summaries"]
        if len(summaries) < 2:
            raise UserError(f"{where}: field 'summaries' must hold at least 2 summaries")
        texts = []
        for i, s in enumerate(summaries):
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise UserError(f"{where}: field 'summaries[{i}].text' is missing or not a string")
            texts.append(tldr_summary(s["text"]))
        if not 0 <= r["choice"] < len(texts):
            raise UserError(f"{where}: field 'choice' is {r['choice']}, not an index into the "
                            f"{len(texts)} summaries")
        best = texts[r["choice"]]
        out += [(prompt, [best, other]) for i, other in enumerate(texts) if i != r["choice"]]
    return out


def tldr_record_prompt(r: dict, where: str) -> str:
    """The prompt of a TL;DR record, its post under "info" or at the top level (the flat filtered set)."""
    info, prefix = (r["info"], "info.") if "info" in r else (r, "")
    if not isinstance(info, dict):
        raise UserError(f"{where}: field 'info' must be an object, got {type(info).__name__}")
    return tldr_prompt(info, where, prefix)


def load_tldr_demonstrations(path, with_lines=False) -> list[tuple[str, str]]:
    """[(prompt, summary)] from {"info": {...}, "summary"} or the flat {"post", ..., "summary"} records."""
    out = []
    for r in read_jsonl(path, {"summary": object}):
        where = f"{path}:{r['_line']}"
        prompt = tldr_record_prompt(r, where)
        summary = r["summary"].get("text") if isinstance(r["summary"], dict) else r["summary"]
        if not isinstance(summary, str):
            raise UserError(f"{where}: field 'summary' must be a string (or an object with a string 'text')")
        out.append((prompt, tldr_summary(summary), r["_line"]))
    return lines_or_not(out, with_lines)


# ------------------------------------------------------------------------------------------------------------------
# Format detection

def unknown_format(path, first: dict, expected: str) -> UserError:
    fields = sorted(k for k in first if k != "_line")
    return UserError(f"{path}:{first['_line']}: unknown format (the first record has fields {fields}); expected "
                     f"{expected}")


def load_preferences(path, articles=False) -> list[tuple[str, list[str]]]:
    """[(prompt, responses best first)] from our rankings or pairs, HH-RLHF pairs, or TL;DR comparisons (their
    CNN/DM records only if articles)."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first and "best" in first:
        return load_choices(path)  # best first, the rest unordered: preference_kind(path) tells
    if "prompt" in first and ("responses" in first or "chosen" in first):
        return load_rankings(path)
    if "chosen" in first and "rejected" in first:
        return load_hh(path)
    if "summaries" in first and "choice" in first:
        return load_tldr(path, articles)
    raise unknown_format(path, first, 'rankings {"prompt", "responses"}, pairs {"prompt", "chosen", "rejected"}, '
                                      'HH-RLHF {"chosen", "rejected"} or TL;DR {"info", "summaries", "choice"}')


def load_demonstrations(path, with_lines=False) -> list[tuple[str, str]]:
    """[(prompt, response)] from our demonstrations, HH-RLHF dialogues (the chosen one), or TL;DR summaries;
    with_lines: [(prompt, response, line number)], for errors found later (a response too long for the context)."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first and "response" in first:
        return load_sft(path, with_lines)
    if "chosen" in first and "prompt" not in first:
        return load_hh_demonstrations(path, with_lines)
    if "summary" in first:
        return load_tldr_demonstrations(path, with_lines)
    raise unknown_format(path, first, 'demonstrations {"prompt", "response"}, HH-RLHF {"chosen", ...} '
                                      'or TL;DR {"info", "summary"} / {"post", "summary"}')


def load_prompts(path, articles=False) -> list[str]:
    """The distinct prompts of a file in any format above, in file order: {"prompt"} records and our
    demonstrations, rankings and pairs; HH-RLHF dialogues (up to the last Assistant turn); TL;DR comparisons or
    demonstrations (the post; CNN/DM articles only if articles). Each prompt once: TL;DR has several comparisons
    per post. An empty prompt is refused (generation continues a prompt: it needs at least one token)."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first:
        records = read_jsonl(path, {"prompt": str})
        for r in records:
            if not r["prompt"]:
                raise UserError(f"{path}:{r['_line']}: field 'prompt' is empty (a prompt needs at least one token)")
        prompts = [r["prompt"] for r in records]
    elif "chosen" in first:
        prompts = [split_transcript(r["chosen"], f"{path}:{r['_line']}: field 'chosen'")[0]
                   for r in read_jsonl(path, {"chosen": str})]
    elif "info" in first or "post" in first:
        prompts = [tldr_record_prompt(r, f"{path}:{r['_line']}")
                   for r in without_articles(path, read_jsonl(path, {}), articles)]
    else:
        raise unknown_format(path, first, 'prompts {"prompt", ...}, HH-RLHF {"chosen", "rejected"} or TL;DR '
                                          '{"info", ...} / {"post", ...}')
    return list(dict.fromkeys(prompts))


# ------------------------------------------------------------------------------------------------------------------
# Token examples for a next-token loss

def encode_text(text: str, block_size: int) -> list[tuple[list[int], int]]:
    """Plain text as examples whose every token but the first is a target (PPO-ptx's pretraining loss): windows of
    block_size tokens, [(tokens, len(tokens) - 1)]; a last window of one token, with nothing to predict, is left out."""
    ids = encode(text)
    windows = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [(w, len(w) - 1) for w in windows if len(w) > 1]


def encode_lm_data(path, block_size: int, text: bool = True) -> list[tuple[list[int], int]]:
    """[(tokens, number of target tokens at the end)] for sft.make_batch: from plain text (text=True: a .txt file,
    or JSONL {"text"}), the loss on every token of block_size windows; else from demonstrations in any format
    above, the loss on the response (a response longer than the context is a FILE:LINE error)."""
    path = Path(path)
    plain = path.name.endswith((".txt", ".txt.gz"))
    if text and not plain:
        first = read_jsonl_first(path)
        text = "text" in first and "prompt" not in first
    if text:
        docs = (["".join(line for _, line in text_lines(path))] if plain
                else [r["text"] for r in read_jsonl(path, {"text": str})])
        examples = [ex for doc in docs for ex in encode_text(doc, block_size)]
        if not examples:
            raise UserError(f"{path}: no text of 2 tokens or more (the LM loss predicts each token from the ones "
                            f"before it)")
        return examples
    examples = []
    for prompt, response, line in load_demonstrations(path, with_lines=True):
        examples.append(encode_example(prompt, response, block_size))
        if examples[-1] is None:
            raise UserError(f"{path}:{line}: the response alone is longer than the context (block_size {block_size} "
                            f"tokens)")
    return examples
