"""One optimizer step of a tiny LoRA run, for test_ddp: `one_step` in the test's own process, or under torchrun
`python ddp_worker.py MODEL_DIR SQUAD_FILE OUT RUNS_JSON` (RUNS_JSON: {name: training options}), each run
written to OUT/name."""
import json
import sys
from pathlib import Path

from loraqa.config import DataArguments, LoraArguments, ModelArguments
from loraqa.training.arguments import LoraQATrainingArguments
from loraqa.training.run import fit, setup

# Plain SGD at learning rate 1 without clipping: the LoRA update is minus the gradient itself (AdamW's first step
# would be about its sign). From a zero B, one step changes only B, by the gradient of B.
ONE_SGD_STEP = dict(max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, warmup_ratio=0.0,
                    weight_decay=0.0, logging_steps=1, eval_strategy="no", save_strategy="no", disable_tqdm=True)


def one_step(model_dir, squad_file, output_dir, **training) -> None:
    run = setup(ModelArguments(model=str(model_dir)), LoraArguments(lora_r=4, lora_dropout=0.0),
                DataArguments(train_file=str(squad_file), validation_file=str(squad_file), max_length=128),
                LoraQATrainingArguments(output_dir=str(output_dir), **{**ONE_SGD_STEP, **training}))
    fit(run)


def validation(model_dir, squad_file, output_dir, **training) -> None:
    """The validation loss of the untrained adapter over the five questions, written to OUT/validation.json."""
    run = setup(ModelArguments(model=str(model_dir)), LoraArguments(lora_r=4, lora_dropout=0.0),
                DataArguments(train_file=str(squad_file), validation_file=str(squad_file), max_length=128),
                LoraQATrainingArguments(output_dir=str(output_dir), **{**ONE_SGD_STEP, "eval_strategy": "steps",
                                                                      **training}))
    metrics = run.trainer.evaluate()
    if run.trainer.is_world_process_zero():
        Path(output_dir, "validation.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    model_dir, squad_file, out, runs = sys.argv[1:5]
    for name, training in json.loads(Path(runs).read_text()).items():
        (validation if training.pop("validation_only", False) else one_step)(model_dir, squad_file, Path(out) / name,
                                                                             **training)
