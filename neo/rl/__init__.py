"""Online RL for language models: rollouts from neo's generator, rewards, advantages and the PPO/GRPO losses.

advantages.py  GAE (PPO), group-normalized advantages (GRPO), whitening
losses.py      the clipped policy loss, the clipped value loss, KL estimators
"""
