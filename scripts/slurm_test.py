"""`make slurm-test` (issue 26), on the one-node cluster scripts/slurm_cluster.sh started (SLURM_CONF set):
a 2-run tiny sweep submitted with `loraqa sweep --executor slurm --wait`; one job requeued mid-run with
`scontrol requeue`, as a preemption would, which must resume from its checkpoint; both runs land with
done.json; `--collect` gives the table the local executor gives on the same spec (timing columns aside).

    python scripts/slurm_test.py WORK_DIR
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


SWEEPS: list[subprocess.Popen] = []


def fail(message: str) -> None:
    print(f"slurm-test: FAILED: {message}", flush=True)
    for sweep in SWEEPS:  # no follower left behind
        sweep.kill()
    sys.exit(1)


def tiny_assets(work: Path) -> tuple[Path, Path]:
    from conftest import CACHE, SQUAD, tiny_gpt2  # the test suite's tiny random GPT-2 and five-question SQuAD

    from loraqa.data.assets import fetch
    from loraqa.model.loading import load_tokenizer

    model = work / "tiny-gpt2"
    tiny_gpt2().save_pretrained(model)
    load_tokenizer(str(fetch("gpt2-tokenizer", CACHE))).save_pretrained(model)
    squad = work / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    return model, squad


def write_spec(work: Path, model: Path, squad: Path) -> Path:
    spec = {
        # enough steps (checkpoints every 5) that a job can be requeued between its first checkpoint and its end
        "base": {"model": str(model), "train_file": str(squad), "validation_file": str(squad), "max_length": 128,
                 "max_steps": 60, "max_train_samples": 4, "per_device_train_batch_size": 2, "eval_steps": 30,
                 "save_steps": 5, "logging_steps": 5, "disable_tqdm": True, "lora_dropout": 0.0},
        "grid": {"learning_rate": [1.0e-3, 5.0e-3]},
        "evaluations": {"test": {"data": str(squad), "max_samples": 5, "max_new_tokens": 4}},
        "select_on": "test",
        "slurm": {"cpus_per_run": 1, "time_min": 30},
    }
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True)


def requeue_mid_run(run_dir: Path, sweep: subprocess.Popen) -> str:
    """Wait for the run's first checkpoint, requeue its job (the run still training), make it eligible again at
    once (Slurm holds a requeued job for about two minutes) and return the job id."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if sweep.poll() is not None:
            fail(f"the sweep ended (exit code {sweep.returncode}) before a job could be requeued")
        claim = json.loads((run_dir / "claim.json").read_text()) if (run_dir / "claim.json").exists() else {}
        if claim.get("running") and any(run_dir.glob("checkpoint-*/trainer_state.json")):
            if (run_dir / "summary.json").exists():
                fail(f"{run_dir.name} finished training before it could be requeued: raise max_steps")
            job = claim["slurm_job_id"]
            requeued = scontrol("requeue", job)
            if requeued.returncode != 0:
                fail(f"scontrol requeue {job}: {requeued.stderr.strip()}")
            print(f"slurm-test: requeued job {job} at {sorted(p.name for p in run_dir.glob('checkpoint-*'))}",
                  flush=True)
            for _ in range(240):
                state = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True,
                                       text=True).stdout.strip()
                if state == "PENDING":
                    scontrol("update", f"JobId={job}", "StartTime=now")
                    return job
                time.sleep(0.5)
            fail(f"job {job} was not queued again after its requeue")
        time.sleep(0.2)
    fail("no checkpoint appeared within 10 minutes")


def without_timing(table: str) -> list[str]:
    """The collected table's rows without its timing columns (s/step, peak MB)."""
    rows, drop = [], set()
    for line in table.splitlines():
        cells = line.split("|")
        if any(cell.strip() == "s/step" for cell in cells):
            drop = {i for i, cell in enumerate(cells) if cell.strip() in ("s/step", "peak MB")}
        rows.append("|".join(c for i, c in enumerate(cells) if i not in drop))
    return rows


def main(work: Path) -> None:
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    model, squad = tiny_assets(work)
    spec = write_spec(work, model, squad)
    from loraqa.study.spec import load_spec
    from loraqa.study.sweep import plan

    runs = plan(load_spec(spec))
    loraqa = [sys.executable, "-m", "loraqa.cli", "sweep", str(spec)]
    slurm_out, local_out = work / "slurm", work / "local"
    sweep = subprocess.Popen(loraqa + ["--output_dir", str(slurm_out), "--executor", "slurm", "--wait"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    SWEEPS.append(sweep)
    requeued = requeue_mid_run(slurm_out / runs[0].run_id, sweep)
    output, _ = sweep.communicate(timeout=900)
    print(output, end="", flush=True)
    if sweep.returncode != 0:
        fail(f"loraqa sweep --executor slurm exited with {sweep.returncode}")
    for run in runs:
        if not (slurm_out / run.run_id / "done.json").exists():
            fail(f"{run.run_id}: no done.json")
    log = (slurm_out / runs[0].run_id / "train.log").read_text()
    trains = [line for line in log.splitlines() if line.startswith("$ loraqa train")]
    if len(trains) != 2 or "--resume_from_checkpoint" not in trains[1]:
        fail(f"the requeued run did not resume from its checkpoint: {trains}")
    summary = json.loads((slurm_out / runs[0].run_id / "summary.json").read_text())
    if not summary.get("resumed_from_step"):
        fail("the requeued run's summary says it did not resume")
    if f"{runs[0].run_id}: restarted" not in output:
        fail("--wait did not report the requeued job's restart")
    print(f"slurm-test: job {requeued} resumed from step {summary['resumed_from_step']} after its requeue; "
          f"both runs done in {time.time() - started:.0f} s", flush=True)

    subprocess.run(loraqa + ["--output_dir", str(local_out)], check=True)  # the local executor, same spec
    from loraqa.study.collect import collect, main_table

    tables = {name: main_table(collect(str(spec), str(out), str(work / f"{name}.json")))
              for name, out in (("slurm", slurm_out), ("local", local_out))}
    if without_timing(tables["slurm"]) != without_timing(tables["local"]):
        fail("--collect differs between the executors:\n" + tables["slurm"] + "\n---\n" + tables["local"])
    print(tables["slurm"])
    print(f"slurm-test: --collect gives the local executor's table; passed in {time.time() - started:.0f} s")


if __name__ == "__main__":
    if not os.environ.get("SLURM_CONF"):
        fail("SLURM_CONF is not set: run it through `make slurm-test` (scripts/slurm_test.sh)")
    main(Path(sys.argv[1]))
