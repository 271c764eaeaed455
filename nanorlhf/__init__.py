"""nanorlhf: the RLHF pipeline of InstructGPT (SFT -> reward model -> PPO), from scratch and small enough to read."""
