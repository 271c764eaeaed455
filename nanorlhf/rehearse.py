"""A rehearsal of the pipeline at GPT-2's real size, offline on a CPU: every stage's shapes, memory and time.

    python -m nanorlhf.rehearse           # `make rehearse`: GPT-2 124M's shape, a few minutes on 2 CPU cores

With random weights and made-up text it learns nothing; it shows that real sizes run through, and what they cost:
1. a randomly initialised GPT-2 (12 layers, 768 wide, 1,024 positions) and a smaller one for the RM (6 layers), as
   Hugging Face directories (config.json + model.safetensors in GPT-2's layout, what `--init_from` reads);
2. data in the public formats with realistic lengths (prompts of 200-600 tokens) and their quirks: HH-RLHF pairs,
   some of which part before the last Assistant turn (and one that shares none), TL;DR comparisons with CNN/DM
   news records among them (no post), and plain text for PPO-ptx;
3. train_sft.py on the HH dialogues, train_rm.py on the HH pairs (--init_from the 6-layer GPT-2), train_ppo.py on
   the TL;DR posts with PPO-ptx on the text: a few steps each, micro-batched, with activation checkpointing, each
   a subprocess whose wall time and peak memory (RSS) are measured;
4. the table of those, and the memory estimate (nanorlhf/checkpoint.py) of each GPT-2 size per GPU, printed and
   written to results/rehearsal.md with the machine and versions.
"""

import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanorlhf.checkpoint import memory_estimate, param_count
from nanorlhf.config import at_least, require, run, seed_range
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.pretrained import CONV1D
from nanorlhf.tokenizer import decode, encode

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had not but "
         "what all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first been its "
         "who now people my made over did down only way find use may water long little very after words called "
         "just where most know get through back much before go good new write our used me man too any day same "
         "right look think also around another came come work three word must because does part even place well "
         "such here take why things help put years different away again off went old number great tell men say "
         "small every found still between name should home big give air line set own under read last never us left "
         "end along while might next sound below saw something thought both few those always looked show large "
         "often together asked house world going want school important until form food keep children feet land "
         "side without boy once animals life enough took sometimes four head above kind began almost live page got "
         "earth need far hand high year mother light parts country father let night following picture being study "
         "second eyes soon times story boys since white days ever paper hard near sentence better best across "
         "during today others however sure means knew try told young miles sun ways thing whole hear example heard "
         "several change answer room sea against top turned learn point city play toward five using himself usually"
         ).split()
SIZES = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280), "1.5B": (48, 25, 1600)}


@dataclass
class RehearseConfig:
    """The pipeline at GPT-2's real size with random weights: time and peak memory of each stage."""

    out: str = "out/rehearsal"
    """folder for the weights, the data, the checkpoints and each stage's log"""
    results: str = "results/rehearsal.md"
    """where the tables are written ("" to print them only)"""
    n_layer: int = 12
    """the policy's transformer blocks (GPT-2 124M: 12)"""
    n_head: int = 12
    """attention heads"""
    n_embd: int = 768
    """width"""
    block_size: int = 1024
    """context length"""
    rm_layers: int = 6
    """the RM's blocks (the policy's width): a smaller RM, as InstructGPT pairs a 6B RM with its 175B policy"""
    sft_steps: int = 3
    """SFT optimizer steps"""
    rm_steps: int = 3
    """RM optimizer steps (one epoch of that many batches)"""
    ppo_iters: int = 2
    """PPO iterations (each: rollouts, scoring, one epoch of updates)"""
    batch_size: int = 2
    """examples (SFT), pairs (RM), rollouts (PPO) per step"""
    micro_batch_size: int = 1
    """per forward and backward pass (--micro_batch_size of the three scripts)"""
    max_new_tokens: int = 32
    """longest sampled response (PPO, and the RM's normalisation samples)"""
    activation_checkpointing: bool = True
    """recompute each block's activations in the backward pass (--activation_checkpointing)"""
    min_prompt: int = 200
    """shortest prompt, in tokens (about)"""
    max_prompt: int = 600
    """longest prompt, in tokens (about)"""
    threads: int = 0
    """torch CPU threads of each stage (0: torch's default)"""
    seed: int = 0
    """random seed (weights and data)"""

    def __post_init__(self):
        at_least(self, 1, "n_layer", "n_head", "n_embd", "rm_layers", "sft_steps", "rm_steps", "ppo_iters",
                 "batch_size", "micro_batch_size", "max_new_tokens", "min_prompt")
        at_least(self, 0, "threads")
        require(self.n_embd % self.n_head == 0, f"--n_embd must be a multiple of --n_head {self.n_head}, got "
                                                f"{self.n_embd}")
        require(self.min_prompt <= self.max_prompt, f"--max_prompt must be at least --min_prompt "
                                                    f"{self.min_prompt}, got {self.max_prompt}")
        require(self.max_prompt + 200 + self.max_new_tokens <= self.block_size,
                f"--block_size must hold --max_prompt + a 200-token reply + --max_new_tokens "
                f"({self.max_prompt + 200 + self.max_new_tokens}), got {self.block_size}")
        seed_range(self)


# ------------------------------------------------------------------------------------------------------------------
# 1. Random GPT-2 weights in Hugging Face's layout

def write_hf_gpt2(directory, cfg: GPTConfig, seed: int) -> None:
    """A randomly initialised GPT-2 (GPT-2's own initialisation) as config.json + model.safetensors: the keys of
    HF's GPT2LMHeadModel, Conv1D weights stored (in, out), the LM head left out (tied to wte)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = GPT(cfg).state_dict()
    tensors = {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()
               if k != "lm_head.weight"}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=cfg.n_layer, n_head=cfg.n_head,
              n_embd=cfg.n_embd, n_positions=cfg.block_size, n_ctx=cfg.block_size, vocab_size=cfg.vocab_size,
              layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)
    (directory / "config.json").write_text(json.dumps(hf, indent=2))


# ------------------------------------------------------------------------------------------------------------------
# 2. Data in the public formats

def text(rng, tokens: int) -> str:
    """Made-up sentences of `tokens` GPT-2 tokens."""
    words = []
    while len(words) < tokens:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        words += [sentence[0].capitalize()] + sentence[1:-1] + [sentence[-1] + "."]
    return decode(encode(" ".join(words))[:tokens])


def dialogue(rng, turns, tokens) -> str:
    """An HH-RLHF transcript of `turns` Human/Assistant exchanges, about `tokens` long, ending with a Human turn
    and the Assistant's cue (the reply is added by the caller)."""
    share = tokens // (2 * turns - 1)
    parts = []
    for t in range(turns):
        parts.append("\n\nHuman: " + text(rng, share))
        if t < turns - 1:
            parts.append("\n\nAssistant: " + text(rng, share))
    return "".join(parts) + "\n\nAssistant:"


def hh_records(rng, n, lo, hi, no_shared_turn=0) -> list[dict]:
    """HH-RLHF pairs {"chosen", "rejected"}: most differ in the last reply only; the 2nd, 6th, 10th, ... part at an
    earlier Assistant turn (the data loader splits them at the last one both share); `no_shared_turn` more share
    none (the loader skips them)."""
    out = []
    for i in range(n + no_shared_turn):
        prompt = dialogue(rng, rng.randint(1, 3), rng.randint(lo, hi))
        chosen, rejected = (prompt + " " + text(rng, rng.randint(30, 120)) for _ in range(2))
        if i % 4 == 1:  # they part at an earlier Assistant turn and go on differently
            head = dialogue(rng, 1, rng.randint(lo, max(lo, hi - 110)))  # the whole prompt: about lo..hi
            chosen, rejected = (head + " " + text(rng, 40) + "\n\nHuman: " + text(rng, 60) + "\n\nAssistant: "
                                + text(rng, rng.randint(30, 120)) for _ in range(2))
        if i >= n:  # no Assistant turn in common: the first Human turns differ
            chosen, rejected = ("\n\nHuman: " + text(rng, 50) + "\n\nAssistant: " + text(rng, 50) for _ in range(2))
        out.append({"chosen": chosen, "rejected": rejected})
    return out


def tldr_records(rng, n, lo, hi, every=5) -> list[dict]:
    """TL;DR comparisons {"info", "summaries", "choice", ...}, the post about lo..hi tokens; every `every`-th is a
    CNN/DM news record: an "article" and no "post" (skipped by the data loader, with a count)."""
    out = []
    for i in range(n):
        info = {"id": f"t3_{i:05d}", "title": text(rng, rng.randint(5, 15)), "subreddit": rng.choice(
            ["relationships", "AskReddit", "personalfinance", "tifu"]), "post": text(rng, rng.randint(lo, hi) - 20)}
        if i % every == every - 1:
            info = {"id": f"dm-{i:05d}", "article": text(rng, rng.randint(lo, hi)), "site": "dailymail"}
        summaries = [{"text": " " + text(rng, rng.randint(10, 40)), "policy": p} for p in ("sup2", "ref")]
        out.append({"info": info, "summaries": summaries, "choice": rng.randrange(2), "worker": "w0",
                    "batch": "batch0", "split": "train"})
    return out


def write_data(cfg: RehearseConfig, folder: Path) -> dict:
    """hh.jsonl (SFT's demonstrations and the RM's pairs), hh_eval.jsonl, tldr.jsonl (PPO's prompts), text.txt
    (PPO-ptx): {name: path}, and the prompts' token lengths."""
    rng = random.Random(cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = dict(hh=hh_records(rng, cfg.rm_steps * cfg.batch_size, cfg.min_prompt, cfg.max_prompt, 1),
                 hh_eval=hh_records(rng, 2, cfg.min_prompt, cfg.max_prompt),
                 tldr=tldr_records(rng, 2 * cfg.batch_size * cfg.ppo_iters + 2, cfg.min_prompt, cfg.max_prompt))
    paths = {}
    for name, records in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["text"] = folder / "text.txt"
    paths["text"].write_text(text(rng, 3 * cfg.block_size))
    lengths = [len(encode(r["chosen"][:r["chosen"].rfind("\n\nAssistant:")])) for r in files["hh"][:-1]]
    lengths += [len(encode(r["info"]["post"])) for r in files["tldr"] if "post" in r["info"]]
    return dict(paths=paths, prompt_tokens=(min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)))


# ------------------------------------------------------------------------------------------------------------------
# 3. The stages, measured

def run_stage(name, args, cwd: Path) -> dict:
    """One script as a subprocess (its output to NAME.log): wall time, peak RSS (the child's own, from wait4),
    and the memory estimate it printed at its start."""
    log = cwd / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / f"train_{name}.py"), *map(str, args)], cwd=cwd,
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    output = log.read_text()
    if proc.returncode:
        sys.exit(f"error: train_{name}.py failed (exit {proc.returncode}); its last lines ({log}):\n"
                 + "\n".join(output.splitlines()[-15:]))
    estimate = re.search(r"memory per process \(estimate\).*; total ([\d.]+) ([MG])B", output)
    number, unit = (float(estimate.group(1)), estimate.group(2)) if estimate else (float("nan"), "M")
    return dict(stage=name, seconds=seconds, peak_rss=usage.ru_maxrss * 1024,  # Linux: kilobytes
                estimate=f"{number} {unit}B", estimate_bytes=number * 2 ** (30 if unit == "G" else 20))


def stages(cfg: RehearseConfig, work: Path, data: dict) -> list[dict]:
    paths = data["paths"]
    common = ["--micro_batch_size", cfg.micro_batch_size, "--batch_size", cfg.batch_size, "--ckpt_interval", 0,
              "--activation_checkpointing", str(cfg.activation_checkpointing).lower(), "--threads", cfg.threads]
    rows = [run_stage("sft", ["--init_from", work / "gpt2", "--data", paths["hh"], "--eval_prompts", "",
                              "--max_iters", cfg.sft_steps, "--warmup_iters", 1, "--eval_interval", cfg.sft_steps,
                              "--max_new_tokens", cfg.max_new_tokens, *common], work)]
    rows.append(run_stage("rm", ["--init_from", work / "gpt2-rm", "--data", paths["hh"], "--eval_data",
                                 paths["hh_eval"], "--epochs", 1, "--warmup_iters", 1, "--n_normalize", 4,
                                 "--sample_batch_size", cfg.batch_size, "--max_new_tokens", cfg.max_new_tokens,
                                 *common], work))
    rows.append(run_stage("ppo", ["--data", paths["tldr"], "--eval_prompts", "", "--iters", cfg.ppo_iters,
                                  "--minibatch_size", cfg.batch_size, "--max_new_tokens", cfg.max_new_tokens,
                                  "--ptx_coef", 0.1, "--ptx_data", paths["text"], *common], work))
    return rows


# ------------------------------------------------------------------------------------------------------------------
# 4. The tables

def gb(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MB"


def size_table(micro=4, block_size=1024, shards=8) -> list[str]:
    """The estimate per GPU for each GPT-2 size: AdamW, bf16 autocast, micro-batches of `micro` sequences of
    block_size tokens; PPO with all four models of that size (the value function's embeddings frozen, the
    default) and the KV cache of one micro-batch of rollouts."""
    lines = ["| GPT-2 | parameters | SFT or RM | SFT or RM, checkpointing | PPO | PPO, checkpointing | "
             f"PPO, checkpointing, FSDP over {shards} |", "|---|---|---|---|---|---|---|"]
    for name, (n_layer, n_head, n_embd) in SIZES.items():
        c = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        n, n_value = param_count(c), param_count(c, head=True)
        trained = n + n_value - c.vocab_size * c.n_embd
        cells = []
        for ppo, ckpt, k in ((False, False, 1), (False, True, 1), (True, False, 1), (True, True, 1),
                             (True, True, shards)):
            if ppo:
                est = memory_estimate(2 * n + 2 * n_value, trained, [(c, micro * block_size)],
                                      [(c, micro * block_size)] * 2, True, ckpt, k)
            else:
                est = memory_estimate(n, n, [], [(c, micro * block_size)], True, ckpt, k)
            cells.append(gb(sum(est.values())))
        lines.append(f"| {name} | {n / 1e6:.0f}M | " + " | ".join(cells) + " |")
    return lines


def report(cfg: RehearseConfig, rows, data, total_s, load) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    threads = cfg.threads or torch.get_num_threads()
    lo, mid, hi = data["prompt_tokens"]
    gaps = [r["peak_rss"] - r["estimate_bytes"] for r in rows]
    what = {"sft": f"{cfg.sft_steps} steps on HH dialogues, from the random GPT-2",
            "rm": f"{cfg.rm_steps} steps on HH pairs, a {cfg.rm_layers}-layer RM, then its normalisation and "
                  "held-out accuracy",
            "ppo": f"{cfg.ppo_iters} iterations on TL;DR posts, PPO-ptx on plain text"}
    lines = [f"# Rehearsal at GPT-2's real size ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.block_size} "
             "positions)", "",
             "`make rehearse` (`python -m nanorlhf.rehearse`): random weights written as Hugging Face GPT-2 "
             "directories, made-up data in the HH-RLHF and TL;DR formats (prompts of "
             f"{lo}-{hi} tokens, median {mid}; HH pairs that part before the last Assistant turn, TL;DR's CNN/DM "
             "records), and each stage run through `--init_from` for a few steps with "
             f"`--batch_size {cfg.batch_size} --micro_batch_size {cfg.micro_batch_size}"
             + (" --activation_checkpointing`" if cfg.activation_checkpointing else "`")
             + f", in fp32. Peak RSS is each stage's process's own (`wait4`); the estimate is the one it prints at "
             "its start (`nanorlhf/checkpoint.py`: weights, gradients, AdamW, KV cache, activations; not the "
             "logits, temporaries or PyTorch's own).", "",
             f"Machine: {cpu or platform.machine()}, {os.cpu_count()} cores ({threads} threads), "
             f"Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; load "
             f"average {load:.1f} at the start (other processes on the cores slow every stage).", "",
             "| stage | what ran | time | peak RSS | estimate at start |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {what[r['stage']]} | {r['seconds']:.0f} s | {gb(r['peak_rss'])} | "
              f"{r['estimate']} |" for r in rows]
    lines += [f"| all | including writing the weights and data | {total_s:.0f} s | | |", "",
              "## Memory per GPU by GPT-2 size (estimate)", "",
              "Training with AdamW under bf16 autocast (fp32 weights, gradients and moments: 16 bytes a trained "
              "parameter), micro-batches of 4 sequences of 1,024 tokens (`--micro_batch_size 4`), the estimate of "
              "`nanorlhf/checkpoint.py`. PPO holds four models of that size (policy and value function trained, "
              "the value function's token embeddings frozen; reference and RM frozen) and the KV cache of one "
              "micro-batch of rollouts; FSDP (`--fsdp`) shards the trained models and their AdamW states. Not counted: "
              "the logits' temporaries and the framework's own memory (on a GPU the CUDA context and the "
              "allocator's slack); on this CPU the peaks measured above exceed the estimate by "
              f"{min(gaps) / 2 ** 30:.1f}-{max(gaps) / 2 ** 30:.1f} GB.", ""]
    return "\n".join(lines + size_table()) + "\n"


def main(cfg: RehearseConfig):
    t0, load = time.time(), os.getloadavg()[0]
    work = Path(cfg.out)
    work.mkdir(parents=True, exist_ok=True)
    policy = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    print(f"writing a random GPT-2 ({param_count(policy) / 1e6:.0f}M) and a {cfg.rm_layers}-layer one for the RM "
          f"to {work} (Hugging Face format)")
    write_hf_gpt2(work / "gpt2", policy, cfg.seed)
    write_hf_gpt2(work / "gpt2-rm", replace(policy, n_layer=cfg.rm_layers), cfg.seed + 1)
    data = write_data(cfg, work / "data")
    print(f"data in {work / 'data'}: prompts of {'-'.join(map(str, data['prompt_tokens'][::2]))} tokens")
    rows = []
    for row in stages(cfg, work, data):
        rows.append(row)
        print(f"{row['stage']}: {row['seconds']:.0f} s, peak RSS {gb(row['peak_rss'])} (estimate {row['estimate']})")
    text_out = report(cfg, rows, data, time.time() - t0, load)
    print("\n" + text_out)
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results).write_text(text_out)
        print(f"wrote {cfg.results}")
    return rows


if __name__ == "__main__":
    run(main, RehearseConfig)
