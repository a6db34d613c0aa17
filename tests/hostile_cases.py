"""Runs checkpoint cases in resource-limited children, one per case: the harness of test_hostile_checkpoints.py.

A hostile file may crash the interpreter (C stack overflow), hang, flood memory, or change state that a
later load in the same process sees. None of that can be observed in the pytest process itself. So the
test writes its cases to a file and runs

    python tests/hostile_cases.py REQUESTS RESULTS [JOBS [TIMEOUT [START [LIMITS]]]]

a server that runs one child per case, at most JOBS at a time, started as `mlx_aim.platforms.child_start`
decides for the platform (START overrides it):
- "fork" (Linux): the server imports numpy and the reader (and with them mlx.core) once and forks; nothing
  of MLX runs in it, and MLX's CPU backend starts no thread at import, so a child lacks nothing, and a case
  costs no interpreter start;
- "spawn" (macOS, where mlx.core's import may already have touched Metal, which is not fork-safe): the
  server imports nothing of MLX and starts a fresh interpreter per case (`python hostile_cases.py --child`),
  which imports the reader itself and says when it is ready.
Each child bounds its memory as `mlx_aim.platforms.memory_limits` says (LIMITS overrides it, comma-separated):
"address-space" sets RLIMIT_AS (Linux enforces it: a flood ends in a MemoryError in the child), "watchdog"
has the server read the child's resident memory every WATCH_S and kill it past WATCHDOG_BYTES of growth
(macOS, which does not enforce RLIMIT_AS; Linux runs both). The child then opens (or loads) its file, reads
every tensor, measures its peak memory (ru_maxrss, which a forked or spawned child starts afresh) and the CPU
time the hostile part took, then loads the honest files and compares them bit for bit with what torch.load
gave. The server kills a child that runs past TIMEOUT_S after it said it was ready, and records every
child's exit status and its output (stdout and stderr go to a log file per case). This module imports
neither torch nor pytest, and the server imports nothing of the tests.

A request is a dict: name, action ("open": open_torch_checkpoint + read every key; "load": mlx_aim.load
on a folder, with `head` a probe head file; "classify": an image file `image` classified with the folder's
model and preprocessing; "lit": a LiT folder opened with its tokenizer and one text embedded; "exec": run a
code string, for checking the harness itself), path, expect ("error": a refusal of `error_type`, a dotted
class name, CheckpointError by default; "ok": success; "either"), values (key -> expected numpy array,
checked where a read succeeds), honest (a list of (path, {key: (dtype name, array)})), log (a file path), and
optionally match (text the refusal's message must hold: the file or key it names), confine ({"root",
"allowed", "forbidden"}: a Python-level open under root outside the allowed paths, or of a forbidden one, is
a failure), max_cpu_seconds (a bound on the CPU time of the hostile part: unlike wall time, a loaded machine
does not move it).
`failure(request, result)` turns a result into None or one line saying what went wrong.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def _platforms():
    """mlx_aim/platforms.py, loaded by path: it imports nothing of mlx, so a spawning server stays free of MLX."""
    spec = importlib.util.spec_from_file_location(
        "_hostile_platforms", Path(__file__).resolve().parents[1] / "mlx_aim" / "platforms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


platforms = _platforms()

TIMEOUT_S = 20.0
START_TIMEOUT_S = 120.0  # from a child's start to its saying it is ready (a spawned one imports the reader)
JOBS = 2
# The child may map this much more than it had mapped when ready: a flood stops at a MemoryError instead of
# taking the machine (2 children at a time), yet honest reads and MLX's own start-up fit easily.
AS_HEADROOM = 3 << 29  # 1.5 GiB
# The watchdog kills a child whose resident memory grew this much since it was ready.
WATCHDOG_BYTES = 3 << 29  # 1.5 GiB
WATCH_S = 0.05
# Growth of the child's peak resident memory over what it had when ready.
PEAK_BOUND_MB = 300
_LOG_TAIL = 1500
_READY = b"R"


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
    from mlx_aim.checkpoints.torch_checkpoint import open_torch_checkpoint

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


def _folder_action(action: str, request: dict) -> None:
    """What a user does with a downloaded model folder: load it (with a probe head file), classify an image with it
    (its preprocessor_config.json), or open a LiT and embed a text (its tokenizer files)."""
    import mlx_aim

    path = request["path"]
    if action == "load":
        mlx_aim.load(path, head=request.get("head"))
    elif action == "classify":
        from mlx_aim.data import preprocessing_for
        from mlx_aim.tasks.classify import classify
        from mlx_aim.tasks.inference import open_model

        model = open_model(path)
        classify(model, [request["image"]], num_workers=0, progress=False,
                 preprocessing=preprocessing_for(model.config, Path(path)))
    elif action == "lit":
        from mlx_aim.tasks.lit import embed_texts, open_lit

        model, tokenizer = open_lit(path)
        embed_texts(model, tokenizer, ["a photo of a cat"])
    else:
        raise AssertionError(f"unknown action {action!r}")


def _error_type(request: dict) -> type:
    """The one exception type a refusal must be (default: the reader's CheckpointError)."""
    module, _, name = request.get("error_type", "mlx_aim.checkpoints.torch_checkpoint.CheckpointError").rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


class _Opens:
    """Records the files Python opens (audit event "open") that lie under `root` but outside `allowed`, or are
    `forbidden`. MLX's own reads (mx.load, in C++) raise no audit event: the error type covers those."""

    def __init__(self, request: dict):
        confine = request.get("confine") or {}
        self.root = os.path.realpath(confine["root"]) if confine else None
        self.allowed = [os.path.realpath(p) for p in confine.get("allowed", [])]
        self.forbidden = {os.path.realpath(p) for p in confine.get("forbidden", [])}
        self.outside: list = []
        self.recording = bool(confine)
        if self.recording:
            sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.recording or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        inside = any(path == a or path.startswith(a + os.sep) for a in self.allowed)
        under_root = self.root is not None and path.startswith(self.root + os.sep)
        if path in self.forbidden or (under_root and not inside):
            self.outside.append(path)


def _attempt(request: dict) -> dict:
    """The hostile part of a case: what happened, at which stage, and what it opened outside its folder."""
    from mlx_aim.checkpoints.torch_checkpoint import open_torch_checkpoint

    action, path = request["action"], request["path"]
    refusal = _error_type(request)
    stage = "open" if action in ("open", "exec") else action
    opens = _Opens(request)
    try:
        if action == "open":
            with open_torch_checkpoint(path) as ckpt:
                stage = "read"
                problems = _read_all(ckpt, request.get("values") or {})
            if problems:
                return {"outcome": "bad-read", "stage": stage, "detail": "; ".join(problems)[:600]}
        elif action == "exec":
            exec(request["code"], {"path": path})
        else:
            _folder_action(action, request)
    except refusal as exc:
        return {"outcome": "error", "stage": stage, "detail": _describe(exc), "outside": opens.outside}
    except BaseException as exc:  # MemoryError, RecursionError, SystemExit...: all are findings here
        return {"outcome": "foreign", "stage": stage, "detail": _describe(exc), "outside": opens.outside}
    finally:
        opens.recording = False
    return {"outcome": "ok", "stage": stage, "detail": "", "outside": opens.outside}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(request: dict, result_fd: int, limits: tuple) -> None:
    """Runs in the child, forked or spawned; never returns."""
    code = 0
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)  # the server made it
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if "address-space" in limits:
            limit = platforms.virtual_memory_bytes() + AS_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        base = platforms.peak_rss_bytes()
        os.write(result_fd, _READY)
        start = _cpu_seconds()
        result = _attempt(request)
        result["cpu_seconds"] = _cpu_seconds() - start
        result["peak_mb"] = (platforms.peak_rss_bytes() - base) / 2**20
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


def _spawned_child(argv: list) -> None:
    """`python hostile_cases.py --child RESULT_FD REQUEST_FILE LIMITS`: a spawned child; never returns."""
    result_fd, request_path, limits = int(argv[2]), argv[3], tuple(argv[4].split(","))
    import numpy  # noqa: F401  (the reader's imports, before the child says it is ready)

    import mlx_aim.checkpoints.torch_checkpoint  # noqa: F401

    with open(request_path, "rb") as f:
        request = pickle.load(f)
    _child(request, result_fd, limits)


class _Running:
    """A child the server waits on."""

    def __init__(self, index: int, pid: int, process: Optional[subprocess.Popen]):
        self.index, self.pid, self.process = index, pid, process
        self.ready = False
        self.deadline = time.monotonic() + START_TIMEOUT_S  # then TIMEOUT_S from when it says it is ready
        self.ready_rss: Optional[int] = None
        self.chunks: list = []
        self.killed_for: Optional[str] = None


def _start(index: int, request: dict, start: str, limits: tuple) -> tuple:
    """Starts the child of `request`; returns (read end of its result pipe, _Running)."""
    Path(request["log"]).write_bytes(b"")
    read_fd, write_fd = os.pipe()
    if start == "fork":
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(request, write_fd, limits)
        os.close(write_fd)
        return read_fd, _Running(index, pid, None)
    request_path = request["log"] + ".request"
    with open(request_path, "wb") as f:
        pickle.dump(request, f)
    with open(request["log"], "ab") as log:
        process = subprocess.Popen([sys.executable, __file__, "--child", str(write_fd), request_path,
                                    ",".join(limits) or "none"],
                                   pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    os.close(write_fd)
    return read_fd, _Running(index, process.pid, process)


def _reap(child: _Running) -> int:
    if child.process is not None:
        child.process.wait()
        return child.process.returncode
    _, status = os.waitpid(child.pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve(requests: list, jobs: int = JOBS, timeout: float = TIMEOUT_S, start: Optional[str] = None,
          limits: Optional[tuple] = None) -> list:
    """Runs every request in its own child; returns one record per request, in order. `start` ("fork" or "spawn")
    and `limits` (of "address-space", "watchdog") default to the platform's (`mlx_aim.platforms`)."""
    here = platforms.current()
    start = start or platforms.child_start(here)
    limits = tuple(platforms.memory_limits(here) if limits is None else limits)
    records: list = [None] * len(requests)
    pending = list(range(len(requests)))[::-1]
    running: dict = {}  # read end of the child's result pipe -> _Running
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop()
            fd, child = _start(index, requests[index], start, limits)
            running[fd] = child
        wait = max(0.0, min(c.deadline for c in running.values()) - time.monotonic())
        if "watchdog" in limits:
            wait = min(wait, WATCH_S)
        ready, _, _ = select.select(list(running), [], [], wait)
        for fd in ready:
            child = running[fd]
            chunk = os.read(fd, 1 << 16)
            if chunk:
                if not child.ready:  # the first byte says the child is ready
                    chunk = chunk[len(_READY):]
                    child.ready = True
                    child.deadline = time.monotonic() + timeout
                    child.ready_rss = platforms.resident_bytes(child.pid) if "watchdog" in limits else None
                child.chunks.append(chunk)
                continue
            del running[fd]  # EOF: the child exited (or closed the pipe)
            os.close(fd)
            records[child.index] = _record(requests[child.index], _reap(child), child)
        now = time.monotonic()
        for fd, child in list(running.items()):
            if child.deadline <= now:
                child.killed_for = (f"hang (killed after {timeout:.0f} s)" if child.ready else
                                    f"did not start (not ready after {START_TIMEOUT_S:.0f} s)")
            elif child.ready_rss is not None:
                rss = platforms.resident_bytes(child.pid)
                if rss is not None and rss - child.ready_rss > WATCHDOG_BYTES:
                    child.killed_for = (f"memory (the watchdog killed it at {rss / 2**20:.0f} MB resident, "
                                        f"{(rss - child.ready_rss) / 2**20:.0f} MB over its start)")
            if child.killed_for is not None:
                del running[fd]
                os.kill(child.pid, signal.SIGKILL)
                os.close(fd)
                records[child.index] = _record(requests[child.index], _reap(child), child)
    return records


def _record(request: dict, status: int, child: _Running) -> dict:
    """What became of a child: `status` is its exit code, or minus the signal that ended it."""
    record = {"killed_for": child.killed_for, "signal": None, "exitcode": None, "result": None}
    if status < 0:
        record["signal"] = -status
    else:
        record["exitcode"] = status
    data = b"".join(child.chunks)
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
    if record["killed_for"] is not None:
        return f"{name}: {record['killed_for']}{output}"
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
        refusal = request.get("error_type", "CheckpointError").rpartition(".")[2]
        problems.append(f"opened and read without a {refusal}")
    elif outcome == "error" and expect == "ok":
        problems.append(f"refused an honest file: {result['detail']}")
    elif outcome == "error" and request.get("match") and request["match"] not in result["detail"]:
        problems.append(f"refused without naming {request['match']!r}: {result['detail']}")
    bound = request.get("max_cpu_seconds")
    if bound is not None and result["cpu_seconds"] > bound:
        problems.append(f"slow: took {result['cpu_seconds']:.1f} s of CPU (bound {bound} s)")
    if result["peak_mb"] > peak_bound_mb:
        problems.append(f"memory: peak grew {result['peak_mb']:.0f} MB (bound {peak_bound_mb} MB)")
    if result.get("outside"):
        problems.append(f"opened outside its folder: {', '.join(sorted(set(result['outside'])))[:300]}")
    for honest in result["honest"]:
        if honest is not None:
            problems.append(f"poisoned later load: {honest}")
    return f"{name}: {'; '.join(problems)}" if problems else None


def main(argv: list) -> int:
    if argv[1] == "--child":
        _spawned_child(argv)
    requests_path, results_path = argv[1], argv[2]
    jobs = int(argv[3]) if len(argv) > 3 else JOBS
    timeout = float(argv[4]) if len(argv) > 4 else TIMEOUT_S
    start = argv[5] if len(argv) > 5 else platforms.child_start(platforms.current())
    limits = tuple(x for x in argv[6].split(",") if x and x != "none") if len(argv) > 6 else None
    if start == "fork":  # the children's code, loaded once here: the reader (and with it mlx.core) and numpy
        import numpy  # noqa: F401

        import mlx_aim.checkpoints.torch_checkpoint  # noqa: F401

    with open(requests_path, "rb") as f:
        requests = pickle.load(f)
    records = serve(requests, jobs, timeout, start, limits)
    with open(results_path + ".part", "wb") as f:
        pickle.dump(records, f)
    os.replace(results_path + ".part", results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
