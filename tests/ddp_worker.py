"""Run by test_ddp under torchrun: train a tiny LoRA model data-parallel, save this rank's LoRA weights."""
import os
import sys

import torch

from loraqa.config import DataArguments, LoraArguments, LoraQATrainingArguments, ModelArguments
from loraqa.train import fit, setup

model_dir, squad_file, out = sys.argv[1:4]
run = setup(ModelArguments(model=model_dir), LoraArguments(lora_r=4),
            DataArguments(train_file=squad_file, validation_file=squad_file, max_length=128),
            LoraQATrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                                    eval_strategy="no", save_strategy="no", disable_tqdm=True, logging_steps=1))
fit(run)
lora = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters() if "lora_" in n}
torch.save({"world_size": run.trainer.args.world_size, "weights": lora},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
