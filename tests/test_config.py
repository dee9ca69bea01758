import dataclasses

import pytest

from loraqa.config import ConfigError, DataArguments, LoraArguments, ModelArguments
from loraqa.training.arguments import LoraQATrainingArguments
from loraqa.args import parse_config, parse_config_with_sources

TRAIN = (ModelArguments, LoraArguments, DataArguments, LoraQATrainingArguments)


def test_flags_beat_the_file_which_beats_a_commands_defaults(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("output_dir: runs/mine\nmax_train_samples: 500\nlearning_rate: 1.0e-3\n")
    defaults = {"output_dir": "runs/main", "max_train_samples": 3000, "save_steps": 50, "eval_steps": 50}
    (model, lora, data, training), sources = parse_config_with_sources(
        TRAIN, ["--config", str(config), "--eval-steps", "7", "--lora_r", "4"], defaults=defaults,
        defaults_source="run")
    assert (training.output_dir, data.max_train_samples, training.learning_rate) == ("runs/mine", 500, 1e-3)
    assert (training.eval_steps, lora.lora_r, training.save_steps, lora.lora_alpha) == (7, 4, 50, 32)
    assert {k: sources[k] for k in ("output_dir", "max_train_samples", "learning_rate", "eval_steps", "lora_r",
                                    "save_steps", "lora_alpha")} == {
        "output_dir": "config file", "max_train_samples": "config file", "learning_rate": "config file",
        "eval_steps": "flag", "lora_r": "flag", "save_steps": "run", "lora_alpha": "default"}
    names = {f.name for t in TRAIN for f in dataclasses.fields(t) if f.init}
    assert set(sources) == names  # every setting, nothing else (not --config, not --help)


def test_a_flag_equal_to_its_default_still_counts_as_a_flag():
    _, sources = parse_config_with_sources(TRAIN, ["--lora_r", "16", "--no_answer_only_logits"])
    assert sources["lora_r"] == "flag" and sources["answer_only_logits"] == "flag"


@pytest.mark.parametrize("argv, message", [
    (["--modle", "x"], "unknown flag --modle (did you mean --model?)"),
    (["--learning-rat=0.1"], "unknown flag --learning-rat (did you mean --learning-rate?)"),
    (["--lora_rr", "4", "--xyzzy"], "unknown flags --lora_rr (did you mean --lora_r?), --xyzzy"),
    (["stray"], "unexpected argument(s) stray"),
    (["--lora_r", "four"], "argument --lora_r/--lora-r: invalid int value: 'four'"),
    (["--remove_unused_columns", "true"], "unknown flag --remove_unused_columns"),
])
def test_argument_errors_are_one_line_with_the_closest_spelling(argv, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(TRAIN, argv)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_unparsable_config_file_names_the_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("learning_rate: 1.0e-3\nlora_r: [4, 8\nlora_alpha: 16\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line 3, column 11: not valid YAML \(expected ',' or"):
        parse_config(TRAIN, ["--config", str(config)])
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot be read \(No such file or directory\)"):
        parse_config(TRAIN, ["--config", str(tmp_path / "missing.yaml")])
    config.write_text("learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) learnin_rate \(did you mean learning_rate\?\)"):
        parse_config(TRAIN, ["--config", str(config)])


def test_remove_unused_columns_is_fixed_false_and_budget_is_checked(tmp_path):
    assert LoraQATrainingArguments(output_dir=str(tmp_path)).remove_unused_columns is False  # transformers: True
    with pytest.raises(ConfigError, match="max_train_minutes=0.0: must be > 0"):
        parse_config(TRAIN, ["--max_train_minutes", "0"])
