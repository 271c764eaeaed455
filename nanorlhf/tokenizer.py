"""GPT-2's byte-pair encoding through tiktoken, working offline.

`tiktoken.get_encoding("gpt2")` downloads its files at first use. Offline we build the same encoding from a local
copy of GPT-2's 50,256 BPE ranks (`gpt2.tiktoken`), which `make setup` fetches from PyPI (see DEVELOPERS.md).
"""

import base64
import functools
import os
from pathlib import Path

import tiktoken

EOT = 50256  # <|endoftext|>: ends every response, and GPT-2's only special token
END = "<|endoftext|>"  # how a response's end is written in text (data files, samples)
PAD = 0  # the pad id; padding is masked by position, so any id works, but never EOT (an EOS must stay visible)

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, each with an optional leading space.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

DEFAULT_RANKS = Path.home() / ".cache" / "nanorlhf" / "gpt2.tiktoken"


def ranks_path() -> Path:
    return Path(os.environ.get("NANORLHF_TIKTOKEN", DEFAULT_RANKS))


def encoding_from_file(path) -> tiktoken.Encoding:
    """Build GPT-2's encoding from a tiktoken-format ranks file (one 'base64(token) rank' per line)."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding: from the local ranks file if present, else tiktoken's own (which needs the network)."""
    path = ranks_path()
    if path.exists():
        return encoding_from_file(path)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, and no local file
        raise RuntimeError(f"GPT-2's BPE ranks are not at {path} and tiktoken could not download them ({e}). "
                           "Run `make setup` (or `python -m nanorlhf.tokenizer --fetch`) to fetch them.") from None


def encode(text: str) -> list[int]:
    """User text to token ids. Every character is ordinary text: "<|endoftext|>" written inside a prompt or a
    response is encoded as the characters it shows, never as the end token (a user cannot end a sequence early)."""
    return get_encoding().encode(text, disallowed_special=())


def encode_response(text: str) -> list[int]:
    """A response to token ids: ordinary text, and EOT for the one END at its very end, the end that the data
    loader (which adds it where missing) or the sampler wrote."""
    if text.endswith(END):
        return encode(text[:-len(END)]) + [EOT]
    return encode(text)


def decode(ids) -> str:
    return get_encoding().decode([int(i) for i in ids])


def fetch(dest: Path) -> None:
    """Fetch gpt2.tiktoken from the openai-whisper source distribution on PyPI (it ships GPT-2's ranks)."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "openai-whisper==20250625", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    tmp_dest.rename(dest)  # atomic: never leave a half-written ranks file


if __name__ == "__main__":
    import sys

    if "--fetch" in sys.argv:
        path = ranks_path()
        if path.exists():
            print(f"{path} is already there")
        else:
            fetch(path)
            print(f"wrote {path}")
    print("Hello world ->", encode("Hello world"))
