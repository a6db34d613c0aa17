"""Runs checkpoint cases in forked, resource-limited children: the harness of test_hostile_checkpoints.py.

A hostile file may crash the interpreter (C stack overflow), hang, flood memory, or change state that a
later load in the same process sees. None of that can be observed in the pytest process itself, and a
fresh `python` per case would cost a second each. So the test writes its cases to a file and runs

    python tests/hostile_cases.py REQUESTS RESULTS

a server that imports numpy and the reader once (nothing of MLX runs in it: a forked child keeps only
the forking thread, so the server must start none that a child would need) and forks one child per case,
at most JOBS at a time. Each child limits its address space, opens (or loads) its file, reads every
tensor, measures its peak memory, then loads the honest files and compares them bit for bit with what
torch.load gave. The server kills a child that runs past TIMEOUT_S, and records every child's exit
status and its output (stdout and stderr go to a log file per case). This module imports neither torch
nor pytest, and the server imports nothing of the tests.

A request is a dict: name, action ("open": open_torch_checkpoint + read every key; "load": mlx_aim.load
on a folder; "exec": run a code string, for checking the harness itself), path, expect ("error": a
CheckpointError at open or read; "ok": success; "either"), values (key -> expected numpy array, checked
where a read succeeds), honest (a list of (path, {key: (dtype name, array)})), log (a file path), and
optionally max_seconds (a bound on the hostile part's time, tighter than the timeout).
`failure(request, result)` turns a result into None or one line saying what went wrong.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import sys
import time
from typing import Optional

TIMEOUT_S = 20.0
JOBS = 2
# The child may map this much more than the server had mapped: a flood stops at a MemoryError instead of
# taking the machine (2 children at a time), yet honest reads and MLX's own start-up fit easily.
AS_HEADROOM = 3 << 29  # 1.5 GiB
# Growth of the child's resident high-water mark over its start (VmHWM starts at the RSS at fork).
PEAK_BOUND_MB = 300
_LOG_TAIL = 1500


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    return text if len(text) < 600 else text[:600] + "..."


def _numpy(array):
    import mlx.core as mx
    import numpy as np

    if array.dtype == mx.bfloat16:  # numpy has no bfloat16: compare its bits
        return np.array(array.view(mx.uint16))
    return np.array(array)


def _mlx_dtype_name(array) -> str:
    return str(array.dtype).rsplit(".", 1)[-1]


def _same(actual, expected) -> bool:
    # Bit for bit: a flipped sign, -0.0 for 0.0 or another NaN payload all count.
    return (
        actual.dtype == expected.dtype
        and actual.shape == expected.shape
        and actual.tobytes() == expected.tobytes()
    )


def _read_all(ckpt, values: dict) -> list[str]:
    """Reads every key; returns what disagreed (shape or dtype against the header, or the expected value)."""
    import mlx.core as mx

    problems = []
    for key in ckpt.keys():
        shape, dtype = tuple(ckpt.shape(key)), ckpt.dtype(key)
        array = ckpt.read(key)
        mx.eval(array)
        if tuple(array.shape) != shape or _mlx_dtype_name(array) != dtype:
            problems.append(f"{key}: read {_mlx_dtype_name(array)}{tuple(array.shape)}, header says {dtype}{shape}")
        elif key in values and not _same(_numpy(array), values[key]):
            problems.append(f"{key}: values differ from the expected ones")
    return problems


def _check_honest(path: str, expected: dict):
    """None when the honest file reads back exactly as torch.load gave it, else what differed."""
    from mlx_aim.torch_checkpoint import open_torch_checkpoint

    try:
        with open_torch_checkpoint(path) as ckpt:
            if ckpt.keys() != list(expected):
                return f"{os.path.basename(path)}: keys {ckpt.keys()} != {list(expected)}"
            for key, (dtype, values) in expected.items():
                if ckpt.dtype(key) != dtype:
                    return f"{os.path.basename(path)}: {key} has dtype {ckpt.dtype(key)}, expected {dtype}"
                actual = _numpy(ckpt.read(key))
                if not _same(actual, values):
                    return f"{os.path.basename(path)}: {key} reads {actual.ravel()[:4]}, expected {values.ravel()[:4]}"
    except BaseException as exc:
        return f"{os.path.basename(path)}: {_describe(exc)}"
    return None


def _attempt(request: dict) -> dict:
    """The hostile part of a case: what happened, and at which stage."""
    from mlx_aim.torch_checkpoint import CheckpointError, open_torch_checkpoint

    action, path = request["action"], request["path"]
    stage = "load" if action == "load" else "open"
    try:
        if action == "open":
            with open_torch_checkpoint(path) as ckpt:
                stage = "read"
                problems = _read_all(ckpt, request.get("values") or {})
            if problems:
                return {"outcome": "bad-read", "stage": stage, "detail": "; ".join(problems)[:600]}
        elif action == "load":
            import mlx_aim

            mlx_aim.load(path)
        elif action == "exec":
            exec(request["code"], {"path": path})
        else:
            raise AssertionError(f"unknown action {action!r}")
    except CheckpointError as exc:
        return {"outcome": "error", "stage": stage, "detail": _describe(exc)}
    except BaseException as exc:  # MemoryError, RecursionError, SystemExit...: all are findings here
        return {"outcome": "foreign", "stage": stage, "detail": _describe(exc)}
    return {"outcome": "ok", "stage": stage, "detail": ""}


def _child(request: dict, result_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        limit = _status_kb("VmSize") * 1024 + AS_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        base_kb = _status_kb("VmHWM")
        start = time.monotonic()
        result = _attempt(request)
        result["seconds"] = time.monotonic() - start
        result["peak_mb"] = (_status_kb("VmHWM") - base_kb) / 1024
        result["honest"] = [_check_honest(p, expected) for p, expected in request.get("honest", [])]
        data = pickle.dumps(result)
        while data:
            data = data[os.write(result_fd, data):]
    except BaseException:  # the harness itself failed: the exit status says so, the log says why
        import traceback

        traceback.print_exc()
        code = 3
    finally:
        os._exit(code)


def serve(requests: list, jobs: int = JOBS, timeout: float = TIMEOUT_S) -> list:
    """Runs every request in its own forked child; returns one record per request, in order."""
    records: list = [None] * len(requests)
    pending = list(range(len(requests)))[::-1]
    running: dict = {}  # read end of the child's result pipe -> [index, pid, deadline, chunks]
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(requests[index], write_fd)
            os.close(write_fd)
            running[read_fd] = [index, pid, time.monotonic() + timeout, []]
        wait = max(0.0, min(entry[2] for entry in running.values()) - time.monotonic())
        ready, _, _ = select.select(list(running), [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                running[fd][3].append(chunk)
                continue
            index, pid, deadline, chunks = running.pop(fd)  # EOF: the child exited (or closed the pipe)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            records[index] = _record(requests[index], status, b"".join(chunks), None)
        now = time.monotonic()
        for fd in [fd for fd, entry in running.items() if entry[2] <= now]:
            index, pid, deadline, chunks = running.pop(fd)
            os.kill(pid, signal.SIGKILL)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            records[index] = _record(requests[index], status, b"".join(chunks), timeout)
    return records


def _record(request: dict, status: int, data: bytes, timed_out: Optional[float]) -> dict:
    """What became of a child; `timed_out` is the timeout it was killed at, or None."""
    record = {"timed_out": timed_out, "signal": None, "exitcode": None, "result": None}
    if os.WIFSIGNALED(status):
        record["signal"] = os.WTERMSIG(status)
    else:
        record["exitcode"] = os.WEXITSTATUS(status)
    if data:
        try:
            record["result"] = pickle.loads(data)
        except Exception:
            record["result"] = None
    try:
        with open(request["log"], "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - _LOG_TAIL))
            record["log_tail"] = log.read().decode("utf-8", "replace")
    except OSError:
        record["log_tail"] = ""
    return record


def failure(request: dict, record: dict, peak_bound_mb: float = PEAK_BOUND_MB):
    """None when the case behaved, else one line naming the case and what went wrong."""
    name = request["name"]
    tail = record.get("log_tail", "").strip().splitlines()[-3:]
    output = f" (output: {' | '.join(tail)})" if tail else ""
    if record["timed_out"] is not None:
        return f"{name}: hang (killed after {record['timed_out']:.0f} s){output}"
    if record["signal"] is not None:
        return f"{name}: crash (signal {signal.Signals(record['signal']).name}){output}"
    result = record["result"]
    if record["exitcode"] != 0 or result is None:
        return f"{name}: child exited with status {record['exitcode']} and no result{output}"
    problems = []
    outcome, expect = result["outcome"], request["expect"]
    if outcome == "foreign":
        problems.append(f"wrong exception type at {result['stage']}: {result['detail']}")
    elif outcome == "bad-read":
        problems.append(f"read disagrees: {result['detail']}")
    elif outcome == "ok" and expect == "error":
        problems.append("opened and read without a CheckpointError")
    elif outcome == "error" and expect == "ok":
        problems.append(f"refused an honest file: {result['detail']}")
    if request.get("max_seconds") is not None and result["seconds"] > request["max_seconds"]:
        problems.append(f"slow: took {result['seconds']:.1f} s (bound {request['max_seconds']} s)")
    if result["peak_mb"] > peak_bound_mb:
        problems.append(f"memory: peak grew {result['peak_mb']:.0f} MB (bound {peak_bound_mb} MB)")
    for honest in result["honest"]:
        if honest is not None:
            problems.append(f"poisoned later load: {honest}")
    return f"{name}: {'; '.join(problems)}" if problems else None


def main(argv: list) -> int:
    requests_path, results_path = argv[1], argv[2]
    jobs = int(argv[3]) if len(argv) > 3 else JOBS
    timeout = float(argv[4]) if len(argv) > 4 else TIMEOUT_S
    # The children's code, loaded once here: the reader (and with it mlx_aim and mlx.core) and numpy.
    import numpy  # noqa: F401

    import mlx_aim.torch_checkpoint  # noqa: F401

    with open(requests_path, "rb") as f:
        requests = pickle.load(f)
    records = serve(requests, jobs, timeout)
    with open(results_path + ".part", "wb") as f:
        pickle.dump(records, f)
    os.replace(results_path + ".part", results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
