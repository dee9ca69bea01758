import subprocess
import sys
from pathlib import Path

import torch


def test_two_cpu_processes_end_with_equal_weights(tmp_path, tiny_gpt2_dir, squad_file):
    out = tmp_path / "ddp"
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(worker), str(tiny_gpt2_dir), str(squad_file), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["weights"].keys() == rank1["weights"].keys()
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert any(k.endswith("lora_B.default.weight") and rank0["weights"][k].abs().sum() > 0 for k in rank0["weights"])
    assert (out / "summary.json").exists()
