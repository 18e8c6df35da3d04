"""The stages as packages (data, pretrain, sft, prefs, rlhf, embed), each with a typed config and a ``run(config)``,
over ``train`` (the shared training loop) over shared modules; see docs/ARCHITECTURE.md."""
