"""loraqa: LoRA fine-tuning of causal language models for SQuAD question answering.

The pipeline, one module per stage: config -> assets -> data -> collator -> modeling -> train ->
generate -> metrics -> stats -> evaluation -> bench -> cli.
"""
__version__ = "0.1.0"
