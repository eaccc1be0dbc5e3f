"""Shared test fixtures: the repository root on sys.path and a runner for the scripts as subprocesses."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def run_script():
    """run_script("vader.py", "--max-steps", "2", ...) -> CompletedProcess (text, stdout/stderr captured).

    `torchrun=N` runs it under `torchrun --standalone --nproc_per_node=N` (CPU, gloo)."""

    def run(script, *args, timeout=600, torchrun=0, env=None):
        cmd = [sys.executable]
        if torchrun:
            cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        cmd += [os.path.join(ROOT, script), *map(str, args)]
        full_env = dict(os.environ)
        if torchrun:  # two processes on two cores: one thread each
            full_env["OMP_NUM_THREADS"] = "1"
        full_env.update(env or {})
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)

    return run
