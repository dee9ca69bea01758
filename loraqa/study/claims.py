"""Per-run claims: `claim.json` in a run directory names the sweep that holds the run (pid, host and process
start for the local executor, the job id for Slurm), written under a file lock, so that two sweeps never train
one run; a claim whose holder is gone is taken over."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from ..files import write_json_atomic


CLAIM = "claim.json"
ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                      "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process (pids are reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_holder(token: str | None = None, slurm_job_id: str | None = None) -> dict:
    """A claim naming this process on this host (or the Slurm job `slurm_job_id`). Claims with the same token
    belong to the same holder: a submitted job takes over its submitter's claim by sharing its token."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "token": token or uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {**holder, "slurm_job_id": slurm_job_id} if slurm_job_id else holder


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from `squeue` (PENDING, RUNNING, COMPLETED, ...), None once Slurm no longer knows it;
    'UNKNOWN' when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    if out.returncode != 0:
        return None if "Invalid job id" in out.stderr else "UNKNOWN"
    states = out.stdout.split()
    return states[0] if states else None


def holder_alive(claim: dict) -> bool:
    """Whether a claim's holder may still be working: its Slurm job is queued or running, or its process is
    alive on this host. A process on another host cannot be checked from here and counts as alive."""
    if claim.get("slurm_job_id"):
        state = slurm_job_state(claim["slurm_job_id"])
        return state == "UNKNOWN" or state in ALIVE_SLURM_STATES
    if claim.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return claim.get("pid_start") in (None, _process_start(int(claim["pid"])))


def describe_holder(claim: dict) -> str:
    who = f"Slurm job {claim['slurm_job_id']}" if claim.get("slurm_job_id") else \
        f"pid {claim.get('pid')} on {claim.get('host')}"
    return f"{who} since {claim.get('since')}"


@contextlib.contextmanager
def _claim_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".claim.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_claim(run_dir: Path) -> dict | None:
    try:
        claim = json.loads((run_dir / CLAIM).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return claim if isinstance(claim, dict) else None


def acquire_claim(run_dir: Path, holder: dict) -> dict | None:
    """Claim the run for `holder`: None when it now holds it (it was free, its own, or its holder is gone),
    else the live claim of another holder, left as it is."""
    with _claim_lock(run_dir):
        claim = read_claim(run_dir)
        if claim and claim.get("token") != holder["token"] and holder_alive(claim):
            return claim
        write_json_atomic(run_dir / CLAIM, holder)
        return None


def release_claim(run_dir: Path, holder: dict) -> None:
    """Drop the claim if `holder` (its token) still has it."""
    with _claim_lock(run_dir):
        claim = read_claim(run_dir)
        if claim and claim.get("token") == holder["token"]:
            (run_dir / CLAIM).unlink(missing_ok=True)


# ---- the code a run was made with ----------------------------------------------------------------------------
