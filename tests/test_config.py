import dataclasses
import typing

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


def _light_setting_sets():
    from loraqa.cli import AskArguments
    from loraqa.config import EvaluateArguments, GenerationSettings

    return [(ModelArguments, EvaluateArguments, GenerationSettings), (ModelArguments, AskArguments, GenerationSettings),
            (ModelArguments, LoraArguments, DataArguments)]


@pytest.mark.parametrize("types", _light_setting_sets(), ids=lambda ts: "+".join(t.__name__ for t in ts))
def test_the_light_settings_parser_makes_huggingfaces_flags(types):
    """SettingsParser (no transformers import) against HfArgumentParser: the same flags, defaults, choices and
    help, and the same dataclasses from the same command lines."""
    from transformers import HfArgumentParser

    from loraqa.args import SettingsParser, settings_parser

    light, reference = SettingsParser(types), HfArgumentParser(types)
    assert isinstance(settings_parser(types), SettingsParser)

    def described(parser):
        return [(a.option_strings, a.dest, a.default, a.choices and list(a.choices), a.nargs, a.const, a.required,
                 a.help, type(a).__name__) for a in parser._actions if a.dest != "help"]

    assert described(light) == described(reference)
    fields = {f.name: f for t in types for f in dataclasses.fields(t)}
    command_lines = [[], ["--model", "smollm2-135m", "--cache-dir", "elsewhere"]]
    for name, f in fields.items():  # every bool both ways and bare; every Literal at each choice
        if f.type in ("bool", bool):
            command_lines += [[f"--{name}"], [f"--{name}", "false"], [f"--{name.replace('_', '-')}", "yes"]]
            if f.default is True:
                command_lines.append([f"--no_{name}"])
        elif "Literal" in str(f.type):
            command_lines += [[f"--{name}", choice] for choice in typing.get_args(typing.get_type_hints(
                next(t for t in types if name in {g.name for g in dataclasses.fields(t)}))[name])]
        elif f.type in ("int", "float", "int | None", "float | None"):
            command_lines.append([f"--{name}", "3"])
    for argv in command_lines:
        assert light.parse_args_into_dataclasses(argv) == reference.parse_args_into_dataclasses(
            argv, look_for_args_file=False), argv
    some_bool = next(name for name, f in fields.items() if f.type in ("bool", bool))
    with pytest.raises(ConfigError, match=f"--{some_bool}\\b.*: Truthy value expected"):
        light.parse_args([f"--{some_bool}", "maybe"])
    some_choice = next(name for name, f in fields.items() if "Literal" in str(f.type))
    with pytest.raises(ConfigError, match=f"--{some_choice}\\b.*: invalid choice: 'maybe'"):
        light.parse_args([f"--{some_choice}", "maybe"])
