"""ctpo/backends/verl/ray_slurm.sh: starts a Ray head and workers over the allocation, runs the command
with RAY_ADDRESS and the allocation's shape, and passes its exit status on. SLURM and Ray are faked by
small scripts on PATH (no cluster needed)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "ctpo" / "backends" / "verl" / "ray_slurm.sh"

FAKES = {
    "scontrol": "echo gpu-a; echo gpu-b; echo gpu-c\n",
    # srun --overlap --nodes=1 --ntasks=1 -w NODE CMD...: log the node and run CMD here
    "srun": 'while [[ "$1" == -* ]]; do [[ "$1" == -w ]] && { node=$2; shift; }; shift; done\n'
    'echo "srun $node $*" >> "$FAKE_LOG"\nexec "$@"\n',
    "hostname": "echo 10.0.0.7\n",
    "ray": 'echo "ray $*" >> "$FAKE_LOG"\n[[ " $* " == *" --block "* ]] && exec sleep 30\nexit 0\n',
    # the node-count probe: report every node alive
    "python": "cat > /dev/null; echo 3\n",
}


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text("#!/usr/bin/env bash\n" + body)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path: Path, *command: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{_fake_bin(tmp_path)}:/usr/bin:/bin",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "gpu-[a-c]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "64",
        "FAKE_LOG": str(log),
        "CTPO_RAY_START_TIMEOUT_S": "20",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), *command], capture_output=True, text=True, env=env, timeout=120
    )
    return proc, log.read_text() if log.exists() else ""


def test_starts_head_and_workers_and_runs_the_command_against_them(tmp_path):
    out = tmp_path / "env.txt"
    proc, calls = _run(tmp_path, "bash", "-c", f"env > {out}")
    assert proc.returncode == 0, proc.stderr
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["RAY_ADDRESS"] == "10.0.0.7:6379"
    assert env["CTPO_VERL_NNODES"] == "3" and env["CTPO_VERL_GPUS_PER_NODE"] == "8"
    assert (
        "srun gpu-a ray start --head --node-ip-address=10.0.0.7 --port=6379 --num-gpus=8 --num-cpus=64"
        in calls
    )
    for worker in ("gpu-b", "gpu-c"):
        assert f"srun {worker} ray start --address=10.0.0.7:6379 --num-gpus=8" in calls
    stops = [
        line for line in calls.splitlines() if line.startswith("srun ") and line.endswith("ray stop --force")
    ]
    assert len(stops) == 3  # torn down on every node


def test_passes_the_commands_exit_status_on(tmp_path):
    proc, _ = _run(tmp_path, "bash", "-c", "exit 3")
    assert proc.returncode == 3


def test_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SCRIPT), "true"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "SLURM allocation" in proc.stderr
