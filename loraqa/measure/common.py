"""What the measurement tools share: a job run in a fresh process (each measurement starts from a clean
heap and allocator), the process's memory from /proc, a description of the machine, and training rows as
collator features."""
from __future__ import annotations

import multiprocessing
import os
import platform
from concurrent.futures import ProcessPoolExecutor

import torch


def in_child(function, job: dict) -> dict:
    """function(job) in a spawned process; its result (picklable) comes back."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, job).result()


def proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine_info(threads: int, note: str) -> dict:
    """CPU model and capability, cores, threads, affinity, load at start and GPU: next to every timing."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {"cpu_model": cpu_model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "note": note}


def features(rows: dict[str, list], indices: list[int]) -> list[dict]:
    """Column-wise training rows -> the collator's per-question features for `indices`."""
    return [{k: rows[k][i] for k in ("input_ids", "labels", "context_length", "context_key")} for i in indices]
