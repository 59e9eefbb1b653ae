"""The benchmarks' own checks that need no timing: the GPU campaign's configs (bench/gpu.sh) load and validate.

The campaign's dry run (``bash bench/gpu.sh --dry-run``, ~1 minute on a CPU) exercises every step with the
tiny model; this checks, in seconds, the configs its GPU steps would use instead (160M/410M/1.4B, bf16, fp16,
compiled), which a dry run never loads.
"""

from __future__ import annotations

import subprocess
import sys

from runs import ROOT, clean_env


def test_gpu_campaign_configs_validate():
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--check"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "configs of the GPU campaign load and validate" in proc.stdout
