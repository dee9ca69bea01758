"""loraqa.measure.decoding_speed: every grid strategy decoded alone, on the same questions, in interleaved rounds;
questions/s and the per-round ratio to greedy."""
import json
import statistics

from loraqa.cli import main
from loraqa.config import GenerationSettings
from loraqa.evaluation.evaluate import grid_strategies
from loraqa.generation import decode
from loraqa.measure.common import interleaved
from loraqa.measure.decoding_speed import summary_lines


def test_each_strategy_is_timed_alone_in_interleaved_rounds(tmp_path, tiny_gpt2_dir, squad_file, monkeypatch, capsys):
    calls = []
    real = decode.generate_answers

    def recording(model, tokenizer, records, settings, **kwargs):
        calls.append((settings.name, tuple(r["id"] for r in records)))
        return real(model, tokenizer, records, settings=settings, **kwargs)

    monkeypatch.setattr(decode, "generate_answers", recording)
    out = tmp_path / "speed.json"
    assert main(["decoding-speed", "--model", str(tiny_gpt2_dir), "--data", str(squad_file), "--questions", "3",
                 "--repeats", "2", "--max_new_tokens", "3", "--torch_threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [s.name for s in grid_strategies(GenerationSettings())]
    assert [row["strategy"] for row in result["strategies"]] == names
    # one untimed warm-up (greedy), then every strategy alone, in the rounds' interleaved order, on the same questions
    assert [name for name, _ in calls] == ["greedy"] + [names[u] for _, u in interleaved(len(names), 2)]
    assert len({questions for _, questions in calls}) == 1 and result["n"] == 3
    greedy = result["strategies"][0]["questions_per_s_repetitions"]
    assert result["strategies"][0]["vs_greedy_repetitions"] == [1.0, 1.0]
    for row in result["strategies"]:
        rates = row["questions_per_s_repetitions"]
        assert len(rates) == 2 and all(rate > 0 for rate in rates)
        assert row["questions_per_s_median"] == statistics.median(rates)
        assert row["vs_greedy_repetitions"] == [rate / g for rate, g in zip(rates, greedy)]
        assert row["vs_greedy_spread"] == [min(row["vs_greedy_repetitions"]), max(row["vs_greedy_repetitions"])]
    assert result["machine"]["torch_threads"] == 1 and isinstance(result["machine"]["cpu_idle_at_end"], bool)
    printed = capsys.readouterr().out
    assert "num_beams=4,in_context" in printed and "written:" in printed
    assert len(summary_lines(result)) == 2 + len(names) + 1  # the table's head, a row per strategy, the load


def test_a_mistaken_setting_is_one_line_before_anything_loads(capsys):
    assert main(["decoding-speed", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "repeats" in err and len(err.strip().splitlines()) == 1
