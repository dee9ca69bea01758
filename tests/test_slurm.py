"""The sweep's claims, its spec checks and its Slurm executor (issue 26) on submitit's local executor: the same
code path as on a cluster, a process per job on this machine. The real scheduler is `make slurm-test`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraqa.cli import main
from loraqa.config import ConfigError
from loraqa.study.spec import load_spec
from loraqa.study.claims import acquire_claim, holder_alive, read_claim, this_holder
from loraqa.study.sweep import code_revision, other_revisions, plan, run_sweep

pytest.importorskip("submitit")

ROOT = Path(__file__).parents[1]


def _spec(tmp_path, model_dir, squad_file, rates=(1.0e-3, 5.0e-3), **base) -> str:
    spec = {
        "base": {"model": str(model_dir), "train_file": str(squad_file), "validation_file": str(squad_file),
                 "max_length": 128, "max_steps": 2, "max_train_samples": 4, "per_device_train_batch_size": 2,
                 "save_steps": 1, "logging_steps": 1, "disable_tqdm": True, "lora_dropout": 0.0, **base},
        "grid": {"learning_rate": list(rates)},
        "evaluations": {"test": {"data": str(squad_file), "max_samples": 2, "max_new_tokens": 2}},
        "select_on": "test",
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _trainings(run_dir: Path) -> int:
    return (run_dir / "train.log").read_text().count("$ loraqa train") if (run_dir / "train.log").exists() else 0


def test_submitit_local_executor_runs_a_two_run_sweep_end_to_end(tmp_path, tiny_gpt2_dir, squad_file, capsys):
    from loraqa.study.slurm import SlurmSettings, submit_sweep

    spec = _spec(tmp_path, tiny_gpt2_dir, squad_file)
    out = tmp_path / "sweep"
    statuses = submit_sweep(spec, str(out), SlurmSettings(time_min=10), wait=True, cluster="local", poll_s=0.5)
    runs = plan(load_spec(spec))
    assert statuses == {r.run_id: "done" for r in runs}
    printed = capsys.readouterr().out
    for run in runs:
        assert f"{run.run_id}: submitted as job" in printed and f"{run.run_id}: done in" in printed
        record = json.loads((out / run.run_id / "done.json").read_text())
        assert record["run_id"] == run.run_id and record["settings"] == run.settings  # the local sweep's identity
        assert record["evaluations"]["test"]["n"] == 2 and record["weights_bytes"] > 0
        assert record["git_revision"] == code_revision()["git_revision"] and isinstance(record["git_dirty"], bool)
        assert _trainings(out / run.run_id) == 1 and read_claim(out / run.run_id) is None  # released
    # a second call finds everything done: nothing submitted, nothing trained again
    assert submit_sweep(spec, str(out), SlurmSettings(), wait=False, cluster="local") == statuses
    assert "submitted" not in capsys.readouterr().out.replace("submitted as", "")
    # --collect's note on runs made at another revision (information only)
    done = out / runs[0].run_id / "done.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "git_revision": "0" * 40, "git_dirty": True}))
    assert other_revisions(out, [r.run_id for r in runs]) == {"0" * 40 + "+dirty": [runs[0].run_id]}


def test_multi_gpu_runs_train_under_torchrun_here_two_gloo_processes(tmp_path, tiny_gpt2_dir, squad_file):
    """gpus_per_run 2: torchrun with 2 processes (gloo on the CPU here), each on half of every batch: one step
    where one process takes two (4 questions, 2 a process per step)."""
    from loraqa.study.slurm import SlurmSettings, submit_sweep

    spec = _spec(tmp_path, tiny_gpt2_dir, squad_file, rates=(1.0e-3,), max_steps=-1, num_train_epochs=1,
                 packing="none")
    out = tmp_path / "sweep"
    statuses = submit_sweep(spec, str(out), SlurmSettings(gpus_per_run=2, time_min=10), wait=True, cluster="local",
                            poll_s=0.5)
    (run_id,) = statuses
    assert statuses[run_id] == "done", (out / run_id / "train.log").read_text()[-3000:]
    assert "torchrun with 2 processes" in (out / run_id / "train.log").read_text()
    summary = json.loads((out / run_id / "summary.json").read_text())
    assert (summary["train_examples"], summary["global_steps"]) == (4, 1)


def test_a_claimed_run_is_skipped_and_taken_over_once_its_holder_is_gone(tmp_path, tiny_gpt2_dir, squad_file,
                                                                          capsys):
    spec = _spec(tmp_path, tiny_gpt2_dir, squad_file)
    out = tmp_path / "sweep"
    held, free = plan(load_spec(spec))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        claim = {**this_holder(), "pid": holder.pid, "pid_start": None}
        assert acquire_claim(out / held.run_id, claim) is None
        (out / held.run_id / "metrics.jsonl").write_text("the holder's\n")  # --overwrite_output_dir would delete it
        statuses = run_sweep(spec, str(out))
        assert statuses == {held.run_id: "held", free.run_id: "done"}
        assert f"{held.run_id}: skipped, held by pid {holder.pid} on " in capsys.readouterr().out
        assert (out / held.run_id / "metrics.jsonl").read_text() == "the holder's\n"
        assert _trainings(out / held.run_id) == 0 and read_claim(out / held.run_id)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert run_sweep(spec, str(out)) == {held.run_id: "done", free.run_id: "done"}  # a dead holder's claim: taken
    assert _trainings(out / held.run_id) == 1 and _trainings(out / free.run_id) == 1


def test_two_sweeps_on_one_directory_never_train_the_same_run(tmp_path, tiny_gpt2_dir, squad_file):
    spec = _spec(tmp_path, tiny_gpt2_dir, squad_file)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "loraqa.cli", "sweep", spec, "--output_dir", str(out)]
    sweeps = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [s.communicate(timeout=900)[0] for s in sweeps]
    assert [s.returncode for s in sweeps] == [0, 0], outputs
    for run in plan(load_spec(spec)):
        assert (out / run.run_id / "done.json").exists()
        assert _trainings(out / run.run_id) == 1, outputs  # trained by one sweep, skipped by the other
    assert sum(text.count("skipped, held by pid") for text in outputs) >= 1, outputs


def test_a_slurm_claim_is_alive_while_squeue_lists_its_job(tmp_path, monkeypatch):
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    monkeypatch.setenv("PATH", f"{squeue.parent}{os.pathsep}{os.environ['PATH']}")
    claim = {**this_holder(), "slurm_job_id": "41_0"}
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    assert holder_alive(claim)
    assert acquire_claim(tmp_path / "run", claim) is None
    assert acquire_claim(tmp_path / "run", this_holder())["slurm_job_id"] == "41_0"  # queued or running: respected
    squeue.write_text("#!/bin/sh\necho COMPLETED\n")
    assert not holder_alive(claim)
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert not holder_alive(claim)  # Slurm has forgotten the job
    mine = this_holder()
    assert acquire_claim(tmp_path / "run", mine) is None and read_claim(tmp_path / "run")["token"] == mine["token"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert holder_alive(claim)  # no squeue to ask: cannot tell, so the claim stands


@pytest.mark.parametrize("change, message", [
    ({"evaluations": {"test": {"max_samples": None}}}, "evaluations.test.max_samples: null is not a value"),
    ({"base": {"learning_rate": "fast"}}, "base.learning_rate: 'fast' is not a valid value"),
    ({"base": {"lora_r": 2.5}}, "base.lora_r: 2.5 is not a valid value"),
    ({"grid": {"packing": ["none", "sideways"]}}, "grid.packing: 'sideways' is not one of"),
    ({"base": {"target_modules": ["q_proj"]}}, "base.target_modules: expected a single value"),
    ({"slurm": {"gpus": 1}}, "slurm: unknown key(s) gpus"),
    ({"slurm": {"time_min": "1h"}}, "slurm.time_min: expected a whole number >= 1, got '1h'"),
    ({"slurm": {"setup": "module load cuda"}}, "slurm.setup: expected a list of shell lines"),
])
def test_a_spec_is_checked_whole_before_anything_runs_or_prints(tmp_path, change, message, capsys):
    spec = {"base": {"max_train_samples": 4}, "evaluations": {"test": {"max_samples": 2}}, "select_on": "test"}
    for key, value in change.items():
        spec[key] = {**spec.get(key, {}), **value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=f"bad.yaml: {message.replace('(', '[(]').replace(')', '[)]')}"):
        load_spec(path)
    assert main(["sweep", str(path), "--output_dir", str(tmp_path / "out"), "--print_commands"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message.split(":")[0] in captured.err
    assert not (tmp_path / "out").exists()


def test_the_slurm_key_and_the_checks_keep_every_committed_run_id(tmp_path):
    """The study's finished runs (results/sweep/*/done.json) keep their ids under today's checks and with a
    `slurm:` mapping added: every one is planned again under its directory's name."""
    study = yaml.safe_load((ROOT / "experiments" / "study.yaml").read_text())
    study["slurm"] = {"partition": "gpu", "gpus_per_run": 1, "cpus_per_run": 8, "time_min": 240, "mem_gb": 32,
                      "setup": ["module load cuda"]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    done = {p.parent.name: json.loads(p.read_text()) for p in (ROOT / "results" / "sweep").glob("*/done.json")}
    if not done:
        pytest.skip("no finished study runs in results/sweep")
    assert all(record["run_id"] == name for name, record in done.items())
    for spec in (load_spec(ROOT / "experiments" / "study.yaml"), load_spec(path)):
        runs = plan(spec, done)
        planned = {r.run_id: r for r in runs}
        # runs `from: best` are planned once the whole grid is done (a grid grown since waits for its new runs),
        # and then for today's selection: a committed one from an earlier selection keeps its directory, not its plan
        grid_done = all(r.run_id in done for r in runs if r.kind == "grid")
        reselected = {r.name: r.settings for r in runs}

        def still_planned(record: dict) -> bool:
            if spec["runs"].get(record["name"], {}).get("from") != "best":
                return True
            return grid_done and reselected.get(record["name"]) == record["settings"]

        expected = {name for name, record in done.items() if still_planned(record)}
        assert expected <= set(planned), sorted(expected - set(planned))
        assert all(planned[name].settings == done[name]["settings"] for name in expected)
        assert len(expected) >= len(done) - 3


@pytest.mark.parametrize("restarts, said", [(0, "started"), (1, "restarted")])
def test_wait_reports_a_restart_it_polled_too_slowly_to_see(tmp_path, tiny_gpt2_dir, squad_file, capsys, restarts,
                                                             said):
    """A short job can start, be requeued and start again between two polls: the claim's restart count (Slurm's
    SLURM_RESTART_COUNT, written by the job) still makes `--wait` say "restarted" (the CI failure of stop 31)."""
    from loraqa.study.slurm import _Followed, _follow

    run = plan(load_spec(_spec(tmp_path, tiny_gpt2_dir, squad_file)))[0]
    run_dir = tmp_path / "out" / run.run_id
    acquire_claim(run_dir, {**this_holder(slurm_job_id="7_0"), "running": True, "restarts": restarts})
    (run_dir / "done.json").write_text("{}")
    statuses = {}
    _follow({run.run_id: _Followed(run, "7_0")}, tmp_path / "out", [run], {}, statuses, poll_s=0)
    out = capsys.readouterr().out
    assert f"{run.run_id}: {said} " in out and statuses[run.run_id] == "done"
