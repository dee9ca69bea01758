"""`loraqa sweep --executor slurm`: every pending run of a sweep as one Slurm job, through submitit.

The runs are those of the local sweep (loraqa.study.sweep): the same identities, directories, resume from the last
checkpoint, `error.json` on failure and `done.json` last; `--collect` reads them unchanged. One job per pending
run, submitted together as a job array; each job claims its run (`claim.json` names the job id, see
loraqa.study.sweep's claims), so a second call never resubmits a run that is queued or running, and a claim whose job
Slurm no longer lists is taken over.

Preemption and time limits: Slurm signals the job (USR2, `signal_delay_s` before the limit); submitit calls
`RunJob.checkpoint`, which resubmits the same run, and requeues the job; the requeued job resumes from the
run's last checkpoint on disk. A job requeued by hand (`scontrol requeue`) resumes the same way.

Runs that depend on the selection (`from: best`: the final model, the best configuration's seeds) are not
submitted until the grid is done: with `--wait` the same call submits them once the grid's jobs have finished;
without it, run the same command again after the grid's jobs are done (it submits only what is still pending).

Multi-GPU: with `gpus_per_run` > 1 a run trains under `torchrun` with one process per GPU (data parallel);
evaluation stays one process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..files import write_json_atomic
from .spec import load_spec
from .claims import (ALIVE_SLURM_STATES, acquire_claim, describe_holder, read_claim, release_claim, slurm_job_state,
                     this_holder)
from .sweep import Run, RunFailed, duration, finished_runs, run_one, estimated_seconds, measured_rates, plan


@dataclass
class SlurmSettings:
    """Resources of each run's job (flags `--slurm_<name>` or the spec's `slurm:` mapping; flags win)."""
    partition: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int | None = None
    time_min: int = 24 * 60
    mem_gb: float | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before each job, e.g. `module load cuda`


SLURM_KEYS = {f.name for f in dataclasses.fields(SlurmSettings)}


def check_slurm_spec(path, settings) -> None:
    """The spec's `slurm:` mapping: known keys, values of the right type; one line naming the key otherwise."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: slurm: expected a mapping with keys {', '.join(sorted(SLURM_KEYS))}")
    unknown = set(settings) - SLURM_KEYS
    if unknown:
        raise ConfigError(f"{path}: slurm: unknown key(s) {', '.join(sorted(unknown))}")
    for key, value in settings.items():
        if key == "partition" and not isinstance(value, str):
            raise ConfigError(f"{path}: slurm.partition: expected a name, got {value!r}")
        if key in ("gpus_per_run", "cpus_per_run", "time_min") and \
                (not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_run" else 1)):
            raise ConfigError(f"{path}: slurm.{key}: expected a whole number"
                              f"{' >= 0' if key == 'gpus_per_run' else ' >= 1'}, got {value!r}")
        if key == "mem_gb" and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{path}: slurm.mem_gb: expected a positive number, got {value!r}")
        if key == "setup" and (not isinstance(value, list) or not all(isinstance(line, str) for line in value)):
            raise ConfigError(f"{path}: slurm.setup: expected a list of shell lines")


def slurm_settings(spec: dict, **flags) -> SlurmSettings:
    """The spec's `slurm:` mapping, overridden by the flags that were given (not None)."""
    values = {**(spec.get("slurm") or {}), **{k: v for k, v in flags.items() if v is not None}}
    return SlurmSettings(**values)


def make_executor(folder: Path, settings: SlurmSettings, cluster: str = "slurm"):
    """A submitit executor for one run per job: Slurm, or submitit's local executor (same code path: a
    process per job on this machine, used by the tests)."""
    import submitit

    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=settings.time_min, gpus_per_node=settings.gpus_per_run,
                                   setup=list(settings.setup))
        return executor
    if cluster != "slurm":
        raise ConfigError(f"unknown cluster {cluster!r}: slurm or local")
    executor = submitit.SlurmExecutor(folder=folder)
    parameters = {"time": settings.time_min, "setup": list(settings.setup), "stderr_to_stdout": True,
                  "additional_parameters": {"requeue": True}}
    if settings.partition:
        parameters["partition"] = settings.partition
    if settings.gpus_per_run:
        parameters["gpus_per_node"] = settings.gpus_per_run
    if settings.cpus_per_run:
        parameters["cpus_per_task"] = settings.cpus_per_run
    if settings.mem_gb:
        parameters["mem"] = f"{int(settings.mem_gb * 1024)}M"
    executor.update_parameters(**parameters)
    return executor


class RunJob:
    """One run as a submitit job: claim it for this job, train (resuming) and evaluate as the local sweep does,
    record the outcome, release the claim. Picklable; `checkpoint` makes it requeueable (submitit's hook)."""

    def __init__(self, run: Run, run_dir: str, token: str, torch_threads: int | None = None, processes: int = 1):
        self.run, self.run_dir, self.token = run, run_dir, token
        self.torch_threads, self.processes = torch_threads, processes

    def __call__(self) -> dict:
        import submitit

        environment = submitit.JobEnvironment()
        run_dir = Path(self.run_dir)
        holder = this_holder(self.token, environment.job_id if environment.cluster == "slurm" else None)
        holder["running"] = True
        # Slurm counts the job's requeues: with it the follower reports a restart it polled too slowly to see
        holder["restarts"] = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        other = acquire_claim(run_dir, holder)
        if other is not None:
            print(f"{self.run.run_id}: held by {describe_holder(other)}; not run", flush=True)
            return {"run_id": self.run.run_id, "status": "held", "holder": other}
        with open(run_dir / "train.log", "a") as log:
            try:
                record = run_one(self.run, run_dir, log, self.torch_threads, self.processes)
            except RunFailed as err:
                if err.returncode is not None and err.returncode < 0 and environment.cluster == "slurm":
                    raise  # killed by Slurm (preempted, requeued): the claim stays with the job, which comes back
                return self._failed(run_dir, holder, err, log.name)
            except (OSError, KeyError, json.JSONDecodeError) as err:
                return self._failed(run_dir, holder, err, log.name)
        release_claim(run_dir, holder)
        return {"run_id": self.run.run_id, "status": "done", "seconds": record["seconds"]}

    def _failed(self, run_dir: Path, holder: dict, err: Exception, log: str) -> dict:
        write_json_atomic(run_dir / "error.json", {"error": str(err), "log": log})
        release_claim(run_dir, holder)
        return {"run_id": self.run.run_id, "status": "failed", "error": str(err)}

    def checkpoint(self, *args, **kwargs):
        """Slurm preempts the job or its time runs out: resubmit this very run; training resumes from the run's
        last checkpoint on disk (written every `save_steps`), evaluations already written are kept."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.run, self.run_dir, self.token, self.torch_threads,
                                                         self.processes))


@dataclass
class _Followed:
    run: Run
    job_id: str
    job: object = None  # the submitit job when submitted by this call
    seen_since: str | None = None
    started: float | None = None


def _job_alive(followed: _Followed) -> bool:
    if followed.job is not None and type(followed.job).__name__ == "LocalJob":
        return not followed.job.done()
    state = slurm_job_state(followed.job_id)
    return state == "UNKNOWN" or state in ALIVE_SLURM_STATES


def submit_sweep(spec_path: str, output_dir: str, settings: SlurmSettings | None = None, *, wait: bool = False,
                 cluster: str = "slurm", torch_threads: int | None = None, poll_s: float = 10.0) -> dict:
    """Submit every pending run as a job (one array); with `wait`, follow them, printing the local sweep's
    per-run lines, submit the runs that wait for the grid once it is done, and return {run_id: status};
    without it return after submitting ({run_id: 'submitted' | 'held' | 'done'})."""
    spec = load_spec(spec_path)
    settings = settings or slurm_settings(spec)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    processes = settings.gpus_per_run if settings.gpus_per_run > 1 else 1
    if torch_threads is None and settings.cpus_per_run:
        torch_threads = max(1, settings.cpus_per_run // processes)
    executor = make_executor(out / ".submitit" / "%j", settings, cluster)
    statuses: dict[str, str] = {}
    following: dict[str, _Followed] = {}
    while True:
        finished = finished_runs(out)
        runs = plan(spec, finished)
        statuses.update({r.run_id: "done" for r in runs if r.run_id in finished})
        pending = [r for r in runs if r.run_id not in finished and r.run_id not in following
                   and statuses.get(r.run_id) not in ("failed", "held")]
        submitted = _submit(executor, pending, out, runs, finished, statuses, following, torch_threads, processes)
        if not wait:
            if submitted:
                print(f"submitted {len(submitted)} job(s): {' '.join(f.job_id for f in submitted)}; follow them "
                      f"with the same command and --wait", flush=True)
            _summary(spec, runs, finished, statuses)
            return statuses
        if not following:
            _summary(spec, runs, finished, statuses)
            return statuses
        _follow(following, out, runs, finished, statuses, poll_s)


def _submit(executor, pending: list[Run], out: Path, runs, finished, statuses, following, torch_threads,
            processes) -> list[_Followed]:
    """Claim each pending run for this call and submit the claimed ones as one batch (a Slurm job array); a run
    another holder has is skipped with one line, or followed when that holder is a Slurm job."""
    claimed = []
    for run in pending:
        run_dir = out / run.run_id
        holder = this_holder()
        other = acquire_claim(run_dir, holder)
        if other is not None:
            if other.get("slurm_job_id"):  # queued or running already (an earlier call): follow it, never resubmit
                following[run.run_id] = _Followed(run, other["slurm_job_id"])
                statuses[run.run_id] = "submitted"
            else:
                statuses[run.run_id] = "held"
            print(f"[{len(finished) + 1}/{len(runs)}] {run.run_id}: skipped, held by {describe_holder(other)}",
                  flush=True)
            continue
        (run_dir / "error.json").unlink(missing_ok=True)  # a failed earlier attempt; its job will write a new one
        claimed.append((run, holder))
    if not claimed:
        return []
    try:
        with executor.batch():
            jobs = [executor.submit(RunJob(run, str(out / run.run_id), holder["token"], torch_threads, processes))
                    for run, holder in claimed]
    except Exception:
        for run, holder in claimed:
            release_claim(out / run.run_id, holder)
        raise
    submitted = []
    for (run, holder), job in zip(claimed, jobs):
        run_dir = out / run.run_id
        update = dict(holder, slurm_job_id=job.job_id) if type(job).__name__ != "LocalJob" else \
            dict(holder, pid=int(job.job_id), pid_start=None)
        claim = read_claim(run_dir)
        if claim and claim.get("token") == holder["token"] and not claim.get("running"):
            acquire_claim(run_dir, update)  # same token: the claim now names the job (unless it already started)
        following[run.run_id] = _Followed(run, job.job_id, job)
        statuses[run.run_id] = "submitted"
        print(f"[{len(finished) + 1}/{len(runs)}] {run.run_id}: submitted as job {job.job_id}", flush=True)
        submitted.append(following[run.run_id])
    return submitted


def _follow(following: dict[str, _Followed], out: Path, runs, finished, statuses, poll_s: float) -> None:
    """Print each run's start (again after a requeue) and outcome until one of them ends."""
    rates = measured_rates(out, finished)
    while True:
        ended = False
        for run_id, followed in list(following.items()):
            run_dir = out / run_id
            claim = read_claim(run_dir) or {}
            if claim.get("running") and claim.get("since") != followed.seen_since:
                again = followed.seen_since is not None or claim.get("restarts", 0) > 0
                followed.seen_since, followed.started = claim["since"], time.time()
                estimate = estimated_seconds(followed.run, rates, run_dir)
                print(f"[{len(finished) + 1}/{len(runs)}] {run_id}: {'restarted' if again else 'started'} "
                      f"{time.strftime('%H:%M')} (job {followed.job_id})"
                      + (f", ~{duration(estimate)}" if estimate else ""), flush=True)
            if (run_dir / "done.json").exists():
                minutes = (time.time() - (followed.started or time.time())) / 60
                print(f"    {run_id}: done in {minutes:.1f} min", flush=True)
                statuses[run_id] = "done"
            elif not _job_alive(followed):
                statuses[run_id] = "failed"
                error = _read_json(run_dir / "error.json")
                result = _job_result(followed)
                if result and result.get("status") == "held":
                    statuses[run_id] = "held"
                    print(f"    {run_id}: skipped, held by {describe_holder(result['holder'])}", flush=True)
                elif error:
                    print(f"    {run_id}: FAILED: {error.get('error')} (log: {error.get('log')})", flush=True)
                else:
                    message = f"job {followed.job_id} ended without a record (cancelled or killed)"
                    write_json_atomic(run_dir / "error.json", {"error": message, "log": str(run_dir / "train.log")})
                    print(f"    {run_id}: FAILED: {message} (log: {run_dir / 'train.log'})", flush=True)
            else:
                continue
            del following[run_id]
            ended = True
        if ended or not following:
            return
        time.sleep(poll_s)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _job_result(followed: _Followed) -> dict | None:
    """The job's return value, when submitit wrote it (a job that raised or was killed has none to give)."""
    job = followed.job
    if job is None or not job.paths.result_pickle.exists():
        return None
    try:
        outcome, value = job._get_outcome_and_result()
    except Exception:  # noqa: BLE001 - an unreadable result is no result
        return None
    return value if outcome == "success" and isinstance(value, dict) else None


def _summary(spec: dict, runs, finished, statuses) -> None:
    waiting = len(spec.get("runs") or {}) - sum(r.kind == "named" for r in runs)
    done = sum(s == "done" for s in statuses.values())
    queued = sum(s == "submitted" for s in statuses.values())
    failed = sum(s == "failed" for s in statuses.values())
    held = sum(s == "held" for s in statuses.values())
    print(f"sweep: {done} runs done" + (f", {queued} submitted" if queued else "")
          + (f", {failed} failed" if failed else "") + (f", {held} held by another sweep" if held else "")
          + (f", {waiting} waiting for the grid" + ("" if queued == 0 else ": run this command again once the "
                                                   "grid's jobs are done") if waiting else ""), flush=True)

