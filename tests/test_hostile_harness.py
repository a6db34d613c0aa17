"""The hostile-case harness (hostile_cases.py) itself: in each way it starts children on this platform, it reports a
crash, a hang, CPU time past a bound, a memory flood stopped by each memory limit the platform has, and the peak
memory a case used, and it passes a case that behaves. The spawn start (macOS's) runs here too, so the path a Mac
takes is tested on Linux."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import hostile_cases
from mlx_aim import platforms
from test_hostile_checkpoints import _subprocess_env

HERE = platforms.current()
STARTS = sorted({platforms.child_start(HERE), "spawn"})
TIMEOUT_S = 6.0  # the hang case's cost; the others end well within it, even on a loaded machine

_TOUCH_MB = "blocks = [b'\\x01' * (64 << 20) for _ in range({n})]"  # resident: every page written
CASES = {
    "behaves": ("x = sum(range(1000))", "ok"),
    "crash": ("import os; os.abort()", "ok"),
    "hang": ("import time\nwhile True: time.sleep(0.01)", "ok"),
    "slow": ("import time\nt0 = time.process_time()\nwhile time.process_time() - t0 < 0.6: pass", "ok"),
    "peak_200mb": (_TOUCH_MB.format(n=3) + "\nblocks.append(b'\\x02' * (8 << 20))", "ok"),
    "flood": (_TOUCH_MB.format(n=64), "ok"),  # 4 GiB, past either limit's 1.5 GiB
}


def _serve(tmp_path, start: str, limits: tuple) -> dict:
    """Runs CASES through the harness server as the hostile suite does; name -> (request, record)."""
    requests = [{"name": name, "action": "exec", "path": "", "code": code, "expect": expect, "log":
                 str(tmp_path / f"{name}.log"), **({"max_cpu_seconds": 0.3} if name == "slow" else {})}
                for name, (code, expect) in CASES.items()]
    requests_path, results_path = tmp_path / "requests.pkl", tmp_path / "results.pkl"
    requests_path.write_bytes(pickle.dumps(requests))
    done = subprocess.run([sys.executable, hostile_cases.__file__, str(requests_path), str(results_path), "2",
                           str(TIMEOUT_S), start, ",".join(limits)], env=_subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = pickle.loads(results_path.read_bytes())
    return {req["name"]: (req, rec) for req, rec in zip(requests, records)}


@pytest.mark.parametrize("limit", platforms.memory_limits(HERE))
@pytest.mark.parametrize("start", STARTS)
def test_harness_reports_each_kind_of_failure(tmp_path, start, limit):
    runs = _serve(tmp_path, start, (limit,))
    failure = {name: hostile_cases.failure(*runs[name]) for name in CASES}
    assert failure["behaves"] is None
    assert runs["behaves"][1]["result"]["outcome"] == "ok"
    assert "crash (signal SIGABRT)" in failure["crash"]
    assert f"hang (killed after {TIMEOUT_S:.0f} s)" in failure["hang"]
    assert "slow: took" in failure["slow"] and "of CPU (bound 0.3 s)" in failure["slow"]
    # The peak is measured from when the child was ready: 200 MB touched, plus the interpreter's own few MB.
    assert failure["peak_200mb"] is None
    assert 190 <= runs["peak_200mb"][1]["result"]["peak_mb"] <= 260
    if limit == "address-space":  # the allocation fails inside the child, which reports it and exits
        assert "wrong exception type at open: builtins.MemoryError" in failure["flood"]
    else:  # the server's watchdog kills the child past its resident bound
        assert "memory (the watchdog killed it at" in failure["flood"]


def test_memory_peak_over_the_bound_is_a_failure():
    request = {"name": "big", "expect": "ok"}
    record = {"killed_for": None, "signal": None, "exitcode": 0, "log_tail": "",
              "result": {"outcome": "ok", "stage": "open", "detail": "", "cpu_seconds": 0.1, "peak_mb": 301.0,
                         "honest": []}}
    assert "memory: peak grew 301 MB (bound 300 MB)" in hostile_cases.failure(request, record)
