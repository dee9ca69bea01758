"""Measurement tools on top of the pipeline: the speed benchmark against a TRL+PEFT script, the padding and
cost studies (side by side, one run), and LoRA's parameter and FLOP counts in closed form."""
