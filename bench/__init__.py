"""The benchmarks, each run as `python -m bench.<name>` (`--help` for its flags): `attention` and `logprobs`, one per
kernel family (built on `_common.py`), and `ppo`, the PPO speed workload."""
