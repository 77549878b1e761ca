"""ctpo.progress: a line at a fixed interval in a log (where, latest metric, throughput, ETA), and the lines
real jobs (`ctpo sft`, `ctpo eval`) write to their logs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctpo.progress import INTERVAL_ENV, Progress, interval_from_env

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"^\[(?P<name>[^\]]+)\] (?P<unit>\w+) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)(?P<rest>.*)$"
)


def _lines(text: str, name: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m and m["name"] == name]


def test_lines_at_the_interval_with_position_metrics_rate_and_eta():
    out = io.StringIO()  # not a terminal: lines, not a bar
    with Progress("job", 10, interval_s=0.05, stream=out) as p:
        assert p.mode == "lines"
        for _ in range(4):
            time.sleep(0.04)
            p.update(tokens=100, loss=0.123456)
        time.sleep(0.3)  # the loop is stuck: the heartbeat still writes
    lines = _lines(out.getvalue(), "job")
    assert lines[0]["done"] == "0" and lines[0]["rest"].endswith("ETA ?")
    assert len(lines) >= 5
    stuck = [m for m in lines[1:-1] if m["done"] == "4"]
    assert len(stuck) >= 3  # written while nothing moved: alive, not hung
    assert (
        "loss 0.1235" in stuck[-1]["rest"] and "tok/s" in stuck[-1]["rest"] and "step/s" in stuck[-1]["rest"]
    )
    eta = re.search(r"ETA (\d+):(\d\d)", stuck[-1]["rest"])
    assert eta is not None
    # 4 steps in t seconds, 6 to go: ETA = 6 * t / 4, to the second
    elapsed = re.search(r"(\d+):(\d\d) elapsed", stuck[-1]["rest"])
    assert int(eta[2]) <= 1.5 * int(elapsed[2]) + 1
    assert lines[-1]["rest"].endswith("stopped")  # closed at 4/10
    done = io.StringIO()
    with Progress("full", 2, interval_s=60, stream=done) as p:
        p.update(2)
    assert _lines(done.getvalue(), "full")[-1]["rest"].endswith("done")


def test_a_resumed_run_counts_only_its_own_steps_in_the_rate():
    out = io.StringIO()
    p = Progress("resumed", 100, initial=90, interval_s=60, stream=out)
    assert "ETA ?" in p.line()  # 90 steps done before this process: no rate yet
    time.sleep(0.05)
    p.update(1)
    rate = float(re.search(r"([\d.]+) step/s", p.line())[1])
    assert rate < 100  # 1 step in >= 50 ms, not 91
    p.close()


def test_disabled_progress_writes_nothing_and_the_interval_is_validated(monkeypatch):
    out = io.StringIO()
    with Progress("quiet", 3, enabled=False, stream=out) as p:
        p.update(3)
    assert out.getvalue() == ""
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5
    for bad in ("soon", "0"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            interval_from_env()


def _run(args: list[str], log: Path, env: dict[str, str]) -> str:
    with log.open("w") as fh:  # a file, as Snakemake's `> {log} 2>&1` gives it
        proc = subprocess.run(
            [sys.executable, "-m", "ctpo", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=900
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_real_warm_up_and_eval_jobs_write_progress_lines_to_their_logs(tmp_path):
    config = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    config["results_dir"] = str(tmp_path / "results")
    config["models"]["tiny-xs"]["sft"] = {"steps": 16, "n_demos": 32, "copy_steps": 4, "log_every": 4}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, INTERVAL_ENV: "0.5", "PYTHONPATH": str(REPO)}
    base = tmp_path / "base"

    log = _run(
        ["sft", "--config", str(path), "--model", "tiny-xs", "--out", str(base)], tmp_path / "sft.log", env
    )
    lines = _lines(log, "warm-up tiny-xs")
    assert lines[0]["done"] == "0" and lines[-1]["done"] == "16" and lines[-1]["rest"].endswith("done")
    assert [int(m["done"]) for m in lines] == sorted(int(m["done"]) for m in lines)
    assert len(lines) >= 3
    middle = [m for m in lines if 0 < int(m["done"]) < 16]
    assert middle and all("tok/s" in m["rest"] and "ETA" in m["rest"] for m in middle)
    assert "loss " in lines[-1]["rest"]
    assert _lines(log, "copy pre-phase tiny-xs")[-1]["done"] == "4"

    eval_args = ["eval", "--config", str(path), "--model-path", str(base), "--benchmark", "arith-easy"]
    log = _run(
        [*eval_args, "--n", "2", "--k", "2", "--out", str(tmp_path / "eval")],
        tmp_path / "eval.log",
        env,
    )
    lines = _lines(log, "eval tiny-xs/base/s0")
    assert lines[0]["unit"] == "episode" and lines[0]["total"] == "4"
    assert lines[-1]["done"] == "4" and "arith-easy avg@2" in lines[-1]["rest"]
