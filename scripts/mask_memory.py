"""Peak memory of the shared-context collator's attention mask at a 16k-token row, and of what training does
to it before the model call (issue 25), for the collator in this checkout or any other version of its file:

    python scripts/mask_memory.py                                  # this checkout's loraqa/data/collate.py
    git show REV:loraqa/data/collate.py > /tmp/collate_rev.py
    python scripts/mask_memory.py --collate /tmp/collate_rev.py    # another revision's

The row is synthetic (token ids do not matter, only the layout): `--paragraphs` paragraphs of
`--context_tokens` context tokens, each followed by `--questions` question+answer blocks of `--block_tokens`.
Peaks are the process's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs before each
phase) above the resident size when the phase began, so the collator's temporaries count too.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import torch


def _rss_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _peak_above_start(run):
    """(what run() returned, MiB of peak resident memory above the resident memory before it)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _rss_mib("VmRSS")
    result = run()
    return result, _rss_mib("VmHWM") - start


def _collator(path: str | None):
    if path is None:
        from loraqa.data.collate import SharedContextCollator
        return SharedContextCollator
    # loaded inside the package, so that its relative imports resolve as the checked-in module's do
    spec = importlib.util.spec_from_file_location("loraqa.data.collate_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SharedContextCollator


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collate", default=None, help="a collate.py to measure (default: the installed one)")
    parser.add_argument("--paragraphs", type=int, default=32)
    parser.add_argument("--context_tokens", type=int, default=392)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--block_tokens", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="the model's weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    length = args.context_tokens + args.block_tokens
    features = [{"input_ids": [7] * length, "labels": [-100] * (length - 1) + [7], "context_key": f"p{p}",
                 "context_length": args.context_tokens} for p in range(args.paragraphs) for _ in range(args.questions)]
    collate = _collator(args.collate)()
    batch, build_mib = _peak_above_start(lambda: collate(features))
    mask = batch["attention_mask"]
    dtype = getattr(torch, args.dtype)
    # what training does to the mask before the model call: the revision's answer_loss cast a float mask to the
    # weights' dtype; a boolean one goes to sdpa as it is, and eager gets an additive one (`block_mask_for`)
    if mask.dtype == torch.bool:
        from loraqa.training.loss import block_mask_for

        conversions = {attention: _peak_above_start(lambda: block_mask_for(mask, attention, dtype))
                       for attention in ("sdpa", "eager")}
    else:
        conversions = {"any": _peak_above_start(lambda: mask.to(dtype))}
    print(json.dumps({"collate": args.collate or "loraqa.data.collate", "tokens": int(batch["input_ids"].shape[1]),
                      "paragraphs": len(batch["paragraph_spans"]), "mask_dtype": str(mask.dtype),
                      "mask_MiB": mask.nbytes / 2**20, "build_peak_MiB": round(build_mib, 1), "weights_dtype": args.dtype,
                      "conversion": {attention: {"dtype": str(converted.dtype), "new_MiB": 0 if converted is mask else
                                                 converted.nbytes / 2**20, "peak_MiB": round(peak, 1)}
                                     for attention, (converted, peak) in conversions.items()}}))

if __name__ == "__main__":
    main()
