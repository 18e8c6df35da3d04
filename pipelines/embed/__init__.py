"""embed: fine-tune a retriever on pairs the corpus gives for free (docstring -> code), in-batch-negative InfoNCE."""
