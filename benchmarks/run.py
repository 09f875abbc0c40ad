"""Run every benchmark and write benchmarks/results/latest.json.

make benchmark          # or: .venv/bin/python -m benchmarks.run
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from benchmarks import audit_bug_detection, dp_step_time, empirical_audit, fairness, scale, simulations
from benchmarks.results import RESULTS


def machine() -> dict[str, str | int]:
    return {
        "cpu_cores": os.cpu_count() or 0,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "dp_step_time": dp_step_time.run(),
        **simulations.run(RESULTS / "runs"),
        "empirical_audit": empirical_audit.run(RESULTS / "empirical-audit-runs"),
        "audit_bug_detection": audit_bug_detection.run(RESULTS / "audit-bug-detection-runs"),
        "fairness": fairness.run(RESULTS / "fairness-runs"),
        "scale": scale.run(RESULTS / "scale-runs"),
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
