"""What the measurement tools share: a job run in a fresh process (each measurement starts from a clean
heap and allocator), the process's memory from /proc, a description of the machine and of its load, repeated
timings (their interleaved order, median and spread), and training rows as collator features."""
from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
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


IDLE_LOAD_PER_CORE = 0.5
IDLE_RULE = (f"cpu_idle_at_start: the 1-minute load average before the study, per core (os.cpu_count), under "
             f"{IDLE_LOAD_PER_CORE}; cpu_idle_at_end: the same after it, less the study's own torch threads (which the "
             f"load average then counts). The load average is the whole system's, container or not")


def cpu_idle(load_1min: float | None, own_threads: int = 0) -> bool | None:
    """Whether nothing but the study kept the CPU busy: the 1-minute load less the study's own threads under
    `IDLE_LOAD_PER_CORE` per core; None where the system gives no load average."""
    if load_1min is None:
        return None
    return max(load_1min - own_threads, 0.0) < IDLE_LOAD_PER_CORE * (os.cpu_count() or 1)


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages; None where the system has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def load_at_end(machine: dict) -> dict:
    """The load after the timings and whether the CPU was still otherwise idle then, to add to `machine_info`'s
    record (so a report can say whether the timings ran on an idle CPU)."""
    load = load_average()
    return {"load_average_at_end": load,
            "cpu_idle_at_end": cpu_idle(load and load[0], machine["torch_threads"])}


def machine_info(threads: int, note: str) -> dict:
    """CPU model and capability, cores, threads, affinity, load at start (and whether the CPU was idle) and GPU:
    next to every timing."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {"cpu_model": cpu_model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": threads,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_at_start": (load := load_average()), "cpu_idle_at_start": cpu_idle(load and load[0]),
            "cpu_idle_rule": IDLE_RULE,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "note": note}


def interleaved(units: int, repeats: int) -> list[tuple[int, int]]:
    """(repetition, unit) pairs in the order to time them: every unit once per round, the rounds alternately
    forwards and backwards. A disturbance (another job, a frequency change) then lands on several units rather
    than on all of one unit's repetitions, and a slow drift favours no unit by its place in the round."""
    return [(r, u) for r in range(repeats) for u in (range(units) if r % 2 == 0 else reversed(range(units)))]


def repeated(key: str, values: list[float | None]) -> dict:
    """`key`_repetitions (every repetition's value), `key`_median and `key`_spread ([min, max]) of repeated
    timings; the median and spread are None when any repetition has no value (CPU time on CUDA)."""
    known = None not in values and bool(values)
    return {f"{key}_repetitions": values, f"{key}_median": statistics.median(values) if known else None,
            f"{key}_spread": [min(values), max(values)] if known else None}


def median_and_spread(record: dict, key: str, digits: int = 2) -> str:
    """'median [min-max]' of a `repeated` record, for summary lines; '-' where not measured."""
    median, spread = record.get(f"{key}_median"), record.get(f"{key}_spread")
    if median is None:
        return "-"
    return f"{median:.{digits}f} [{spread[0]:.{digits}f}-{spread[1]:.{digits}f}]" if spread else f"{median:.{digits}f}"


def load_line(machine: dict, repeats: int | None) -> str:
    """The load averages around the timings and whether the CPU was otherwise idle, for summary lines."""
    def load(key):
        return "?" if machine.get(key) is None else f"{machine[key][0]:.2f}"
    def idle(key):
        return {True: "idle", False: "NOT idle", None: "?"}[machine.get(key)]
    return (f"{repeats} repetitions; 1-min load average {load('load_average_at_start')} at start "
            f"({idle('cpu_idle_at_start')}), {load('load_average_at_end')} at end "
            f"({idle('cpu_idle_at_end')} beside the study's {machine.get('torch_threads')} threads) "
            f"on {machine.get('cpu_count')} cores")


def features(rows: dict[str, list], indices: list[int]) -> list[dict]:
    """Column-wise training rows -> the collator's per-question features for `indices`."""
    return [{k: rows[k][i] for k in ("input_ids", "labels", "context_length", "context_key")} for i in indices]
