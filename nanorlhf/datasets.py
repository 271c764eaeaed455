"""Real preference and demonstration data sets, read into nanorlhf's own forms.

Whatever the file looks like, the training scripts get what nanorlhf.data gives them:
    demonstrations  [(prompt, response)]                    response ends with "<|endoftext|>"
    preferences     [(prompt, [response, ...])]             best first, K >= 2, each ending with "<|endoftext|>"
    prompts         [prompt]                                each once, from a file in any of the formats below

Formats understood (JSONL, one record a line; the format is told from the first record):

  ours         {"prompt", "response"}, {"prompt", "responses"} or {"prompt", "chosen", "rejected"}  (see data.py)
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

A bad record stops the run with `error: FILE:LINE: ...` naming the field, as nanorlhf.data does.
"""

from pathlib import Path

from nanorlhf.config import UserError
from nanorlhf.data import load_rankings, load_sft, read_jsonl, read_jsonl_first, with_end

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


def load_hh_demonstrations(path) -> list[tuple[str, str]]:
    """[(prompt, response)] from HH-RLHF records, the chosen dialogue's last reply as the demonstration."""
    out = []
    for r in read_jsonl(path, {"chosen": str}):
        prompt, response = split_transcript(r["chosen"], f"{path}:{r['_line']}: field 'chosen'")
        out.append((prompt, with_end(response)))
    return out


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


def load_tldr_demonstrations(path) -> list[tuple[str, str]]:
    """[(prompt, summary)] from {"info": {...}, "summary"} or the flat {"post", ..., "summary"} records."""
    out = []
    for r in read_jsonl(path, {"summary": object}):
        where = f"{path}:{r['_line']}"
        prompt = tldr_record_prompt(r, where)
        summary = r["summary"].get("text") if isinstance(r["summary"], dict) else r["summary"]
        if not isinstance(summary, str):
            raise UserError(f"{where}: field 'summary' must be a string (or an object with a string 'text')")
        out.append((prompt, tldr_summary(summary)))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Format detection

def unknown_format(path, first: dict, expected: str) -> UserError:
    return UserError(f"{path}: unknown format (the first record has fields {sorted(first)}); expected {expected}")


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


def load_demonstrations(path) -> list[tuple[str, str]]:
    """[(prompt, response)] from our demonstrations, HH-RLHF dialogues (the chosen one), or TL;DR summaries."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first and "response" in first:
        return load_sft(path)
    if "chosen" in first and "prompt" not in first:
        return load_hh_demonstrations(path)
    if "summary" in first:
        return load_tldr_demonstrations(path)
    raise unknown_format(path, first, 'demonstrations {"prompt", "response"}, HH-RLHF {"chosen", ...} '
                                      'or TL;DR {"info", "summary"} / {"post", "summary"}')


def load_prompt_texts(path) -> list[str]:
    """The distinct prompts of a file in any format above, in file order: {"prompt"} records and our
    demonstrations, rankings and pairs; HH-RLHF dialogues (up to the last Assistant turn); TL;DR comparisons or
    demonstrations (the post). Each prompt once: TL;DR has several comparisons per post."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "prompt" in first:
        prompts = [r["prompt"] for r in read_jsonl(path, {"prompt": str})]
    elif "chosen" in first:
        prompts = [split_transcript(r["chosen"], f"{path}:{r['_line']}: field 'chosen'")[0]
                   for r in read_jsonl(path, {"chosen": str})]
    elif "info" in first or "post" in first:
        prompts = [tldr_record_prompt(r, f"{path}:{r['_line']}") for r in read_jsonl(path, {})]
    else:
        raise unknown_format(path, first, 'prompts {"prompt", ...}, HH-RLHF {"chosen", "rejected"} or TL;DR '
                                          '{"info", ...} / {"post", ...}')
    return list(dict.fromkeys(prompts))
