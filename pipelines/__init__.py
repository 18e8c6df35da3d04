"""One module per stage (data, pretrain, sft, reward, rlhf), each with a typed config, ``run(config)`` and a CLI hook."""
