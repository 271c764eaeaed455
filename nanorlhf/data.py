"""Data files: our JSONL formats and the public ones (HH-RLHF, TL;DR), told apart by their first record, read
into nanorlhf's own forms with one-line errors (`error: FILE:LINE: ...` naming the field, never a traceback).

What the training scripts get, whatever the file looks like:
    demonstrations  [(prompt, response)]          load_demonstrations (with_lines: [(prompt, response, line)])
    preferences     [(prompt, [response, ...])]   load_preferences: best first, K >= 2
    prompts         [prompt]                      load_prompts: each distinct prompt once, from a file in any format
Every response ends with "<|endoftext|>" (added when missing). A file that cannot be read as UTF-8 JSONL (a
directory, bytes that are not UTF-8, a .gz file that is not gzip) is a one-line error too; lines are counted from 1,
blank lines included, so FILE:LINE is the line an editor shows.

Formats (JSONL, one record a line, UTF-8; a .gz file is read as gzip):

  ours         demonstrations {"prompt", "response"}; rankings {"prompt", "responses": [best first]};
               pairs {"prompt", "chosen", "rejected"} (a ranking of K = 2); prompts {"prompt"}
  HH-RLHF      {"chosen": transcript, "rejected": transcript}   (Anthropic's helpful/harmless data, Bai et al. 2022)
               A transcript is "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: ..."; the two differ
               only in the last Assistant turn. The prompt is everything up to and including the last
               "\n\nAssistant:", the response is what follows it.
  TL;DR        comparisons {"info": {"post", "title"?, "subreddit"?}, "summaries": [{"text"}, ...], "choice": i}
               (OpenAI's summarize-from-feedback, Stiennon et al. 2020), and demonstrations {"info", "summary"} or
               the flat {"post", "title"?, "subreddit"?, "summary"} of the filtered TL;DR set. The prompt is
                   SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:
               (lines without a value are left out) and a summary gets a leading space if it has none, so it reads
               "TL;DR: summary" as GPT-2 tokenizes it.
"""

import contextlib
import gzip
import json
import os
import zlib
from pathlib import Path

from nanorlhf.config import UserError

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


def json_lines(path):
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a one-line UserError.

    Read as bytes and decoded line by line, so a line that is not UTF-8 is named (a UTF-8 byte-order mark at the
    start is allowed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(r, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
                yield lineno, r
    except gzip.BadGzipFile as e:
        if lineno == 0:
            raise UserError(f"{path}: not gzip data (a file whose name ends in .gz is read as gzip)") from None
        raise UserError(f"{path}:{lineno + 1}: the gzip data is corrupt ({e})") from None
    except (EOFError, zlib.error) as e:  # a .gz file cut off, or damaged
        raise UserError(f"{path}:{lineno + 1}: the gzip data is cut off or corrupt ({e})") from None
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


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


def load_hh(path) -> list[tuple[str, list[str]]]:
    """[(prompt, [chosen, rejected])] from HH-RLHF records {"chosen", "rejected"}."""
    out = []
    for r in read_jsonl(path, {"chosen": str, "rejected": str}):
        where = f"{path}:{r['_line']}"
        prompt, chosen = split_transcript(r["chosen"], f"{where}: field 'chosen'")
        other, rejected = split_transcript(r["rejected"], f"{where}: field 'rejected'")
        if other != prompt:
            raise UserError(f"{where}: fields 'chosen' and 'rejected' differ before their last Assistant turn "
                            f"(a pair must answer the same prompt)")
        out.append((prompt, [with_end(chosen), with_end(rejected)]))
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

def tldr_prompt(info: dict, where: str, prefix: str) -> str:
    """The summarization prompt for a Reddit post: SUBREDDIT / TITLE / POST lines, then "TL;DR:".

    prefix names where info sits in the record ("info." or ""), for the error messages."""
    post = info.get("post")
    if not isinstance(post, str):  # CNN/DM records have an "article" instead: not supported
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
    lines.append("POST: " + post)
    return "\n".join(lines) + "\nTL;DR:"


def tldr_summary(text: str) -> str:
    """A summary as the response to "...TL;DR:": a leading space (GPT-2 tokens carry it), then the end token."""
    return with_end(text if text[:1].isspace() else " " + text)


def load_tldr(path) -> list[tuple[str, list[str]]]:
    """Comparisons {"info", "summaries", "choice"} -> [(prompt, [chosen, other])].

    Only the best summary is known, so K > 2 summaries give K - 1 pairs (chosen, other), never an invented order.
    """
    out = []
    for r in read_jsonl(path, {"info": dict, "summaries": list, "choice": int}):
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


def load_preferences(path) -> list[tuple[str, list[str]]]:
    """[(prompt, responses best first)] from our rankings or pairs, HH-RLHF pairs, or TL;DR comparisons."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first and ("responses" in first or "chosen" in first):
        return load_rankings(path)
    if "chosen" in first and "rejected" in first:
        return load_hh(path)
    if "summaries" in first and "choice" in first:
        return load_tldr(path)
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


def load_prompts(path) -> list[str]:
    """The distinct prompts of a file in any format above, in file order: {"prompt"} records and our
    demonstrations, rankings and pairs; HH-RLHF dialogues (up to the last Assistant turn); TL;DR comparisons or
    demonstrations (the post). Each prompt once: TL;DR has several comparisons per post. An empty prompt is refused
    (generation continues a prompt: it needs at least one token)."""
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
        prompts = [tldr_record_prompt(r, f"{path}:{r['_line']}") for r in read_jsonl(path, {})]
    else:
        raise unknown_format(path, first, 'prompts {"prompt", ...}, HH-RLHF {"chosen", "rejected"} or TL;DR '
                                          '{"info", ...} / {"post", ...}')
    return list(dict.fromkeys(prompts))
