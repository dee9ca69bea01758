"""Stage 2, model: a name or path -> a causal LM and its tokenizer (fetched aliases, hub fallback), with LoRA
attached by preset or module suffix; both attention kernels (per-paragraph training, shared-prefix decoding)."""
