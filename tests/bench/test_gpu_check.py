"""`scripts/gpu_check.sh` / `python -m bench.gpu_check`: without CUDA it says so and exits 0; its
checks run (and pass) on CPU with `--device cpu`, so the code a GPU run depends on is exercised here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.paths import REPO


def test_script_says_no_cuda_and_exits_0():
    if torch.cuda.is_available():
        return  # a GPU machine runs the real thing instead
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_script_takes_options_without_a_folder(tmp_path):
    """`gpu_check.sh --no-bench` passes the option on (it was once read as the report folder), and
    a relative folder is the caller's, not the repository's (the interpreter is `echo` here: this
    checks what the script runs, not the checks)."""
    script, env = str(REPO / "scripts" / "gpu_check.sh"), {**os.environ, "PYTHON": "/bin/echo"}
    default = f"-m bench.gpu_check --out {REPO}/bench/results/gpu_check"
    for args, expected in (([], default), (["--no-bench"], f"{default} --no-bench"),
                           (["here", "--no-bench"], f"-m bench.gpu_check --out {tmp_path}/here --no-bench"),
                           ([str(tmp_path / "abs")], f"-m bench.gpu_check --out {tmp_path}/abs")):
        done = subprocess.run([script, *args], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == expected, (args, done.stdout, done.stderr)


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine (a few idle)
def test_checks_run_on_cpu(tmp_path):
    from bench import gpu_check

    assert gpu_check.main(["--device", "cpu", "--step", "static", "--no-bench", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and set(report["checks"]) == {"parity", "syncs", "reroute_syncs", "graphs"}
    assert report["checks"]["syncs"]["counted_reads_per_step"] <= 2
    reroute = report["checks"]["reroute_syncs"]
    assert reroute["rows_2"]["counted_reads_per_step"] == reroute["rows_6"]["counted_reads_per_step"] <= 3
    assert report["checks"]["graphs"]["cache_moved"] is False
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu_check on cpu")
