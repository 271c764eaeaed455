# `make demo`: set up what is missing, then run the pipeline on the built-in task.
# `make test`: set up what is missing, then run the tests.
# `make bench`: set up what is missing, then the kernel benchmarks (on CPU: small sizes) and the PPO speed workload.
# `make online`: after `make demo`, Ziegler et al.'s online labels against the demo's offline RM at equal labels.
# `make rehearse`: the pipeline at GPT-2 124M's real size with random weights, offline; writes results/rehearsal.md.
# `make compile`: compile every kernel for A100 and H100 on the CPU; registers, spills, shared memory to results/.
# `make gpu`: on a machine with one GPU, tests, kernel benchmarks, PPO and the demo into results/gpu.md (< 8 min).
PY ?= python3
STAMP := .setup-done

.PHONY: setup demo test bench online rehearse clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# torch only when missing: an open-ended `torch` requirement would pull the newest CUDA build (GBs).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	@# triton has Linux wheels only; elsewhere the kernel tests skip and the PyTorch paths run.
	if [ "$$(uname -s)" = Linux ]; then $(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==3.9.0; fi
	$(PY) -m pip install -e ".[test]"
	$(PY) -m nanorlhf.tokenizer --fetch
	touch $(STAMP)

demo: setup
	$(PY) -m nanorlhf.tasks --out data
	$(PY) train_sft.py
	$(PY) train_rm.py
	$(PY) train_ppo.py
	$(PY) -m nanorlhf.evaluate

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.attention
	$(PY) -m bench.logprobs
	$(PY) -m bench.ppo

# The demo's RM learned from 4,000 rankings; here an RM on 2,000, then 10 rounds of 200 labels of the policy's
# samples while PPO runs (4,000 in all); the two PPO runs side by side on held-out gold and over-optimisation.
online: setup
	$(PY) train_rm.py --n_prompts 2000 --out out/online/rm.pt
	$(PY) train_ppo.py --rm out/online/rm.pt --online_every 15 --online_prompts 200 --out out/online/ppo.pt
	$(PY) -m nanorlhf.evaluate --ppo out/online/ppo.pt --out out/online/eval.md
	$(PY) -m nanorlhf.overopt --ppo out/ppo.pt,out/online/ppo.pt --labels offline,online --out out/online/overopt

rehearse: setup
	$(PY) -m nanorlhf.rehearse

.PHONY: compile gpu
compile: setup
	$(PY) -m bench.compile --check --write

# no `setup`: a lent GPU machine may have no network; bench/gpu.py installs what it lacks from .whl/
gpu:
	$(PY) -m bench.gpu --write

clean:
	rm -rf out data $(STAMP)
