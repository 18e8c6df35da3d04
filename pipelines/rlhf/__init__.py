"""``genloop rlhf``: GRPO and PPO with vLLM rollout actors and a Ray Train learner (see ``stage.py``)."""
