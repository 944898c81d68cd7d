"""The lean trainer: ``python -m rlkern.train`` (see ``__main__``) runs SFT, a reward model, PPO (clip and
penalty), GRPO, DPO and TRPO on a tiny Llama-style model or any local Hugging Face causal LM, with every
hot loop (log-probs, entropy, KL, GAE, whitening, losses, advantages) on ``rlkern.ops``."""
