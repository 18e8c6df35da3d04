"""Tokenizer, transformer, parallelism wrappers, Hugging Face–format checkpoint I/O, and the vLLM engine wrapper."""
