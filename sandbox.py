"""The sandbox that runs untrusted code: model-written programs for the code reward (report §3.3.4.1) and the
HumanEval check in evaluate.py.

`run_python(code)` runs the code in a fresh interpreter, in its own temporary directory, with a scrubbed
environment, a wall-clock timeout, limits on CPU time, address space, processes and file size, in a new
session; as root, also as a fresh unused uid, so that the process limit binds and every process the run left
behind is found and killed. It isolates neither the network nor the world-writable directories (what a run
leaves at their top level is removed): run models' code on a machine without secrets or network access.
It is thread-safe: the CoPG scorer runs many sandboxes at once.
"""
import contextlib
import itertools
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SANDBOX_PYTHON = "/usr/bin/python3"   # world-executable, unlike pyenv's under /root (mode 700)
SANDBOX_UID_BASE = 1_000_000_000      # far above any account; + pid * 256 + run: unique per process and run
_uid_lock, _uid_runs = threading.Lock(), itertools.count()
# The child sets its own limits before it runs the code, rather than a preexec_fn, which is unsafe when the
# caller runs sandboxes from several threads (as the CoPG scorer and the HumanEval test do).
_BOOT = ("import resource, runpy\n"
         "for name, value in {limits}:\n"
         "    resource.setrlimit(getattr(resource, name), (value, value))\n"
         "runpy.run_path('main.py', run_name='__main__')\n")


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 16,
               max_file_mb: int = 16) -> RunResult:
    """Run untrusted code in a fresh interpreter, in its own temporary directory, with a scrubbed environment,
    a wall-clock timeout, limits on CPU time, address space, processes and file size (stdout and stderr are
    files, so the size limit caps them too), in a new session. As root, also as a fresh unused uid: then the
    process limit holds, root's files and the parent's /proc entries are out of reach, and every process the
    run left behind, even one that called setsid(), is found by its uid and killed. Never raises for what the
    code does."""
    as_root = os.geteuid() == 0
    if as_root:
        with _uid_lock:
            uid = SANDBOX_UID_BASE + os.getpid() * 256 + next(_uid_runs) % 256
    limits = [("RLIMIT_CPU", math.ceil(timeout) + 1), ("RLIMIT_AS", memory_mb << 20),
              ("RLIMIT_NPROC", max_processes), ("RLIMIT_FSIZE", max_file_mb << 20), ("RLIMIT_CORE", 0)]
    drop = {"user": uid, "group": uid, "extra_groups": []} if as_root else {}   # [] drops root's groups too
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir, \
            tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        if as_root:
            os.chown(workdir, uid, uid)
        process = subprocess.Popen(
            [SANDBOX_PYTHON if as_root else sys.executable, "-I", "-B", "-c", _BOOT.format(limits=limits)],
            cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True, **drop)
        timed_out = not wait_for_exit(process, timeout)
        kill_leftovers(process.pid, uid if as_root else None)
        process.wait()
        if as_root:
            os.chown(workdir, 0, 0)   # leave it to TemporaryDirectory, not to the sweep below
            remove_files_of(uid)
        stdout.seek(0), stderr.seek(0)
        output, errors = (file.read(max_file_mb << 20).decode(errors="replace") for file in (stdout, stderr))
        return RunResult(process.returncode, output, errors, timed_out)


def wait_for_exit(process: subprocess.Popen, timeout: float) -> bool:
    """Whether the process exits within timeout seconds. Blocks on a pidfd, which wakes the moment it exits;
    Popen.wait(timeout) instead polls with sleeps of up to 50 ms, more than a short run itself takes."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):   # not Linux >= 5.3
        try:
            process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def kill_leftovers(pid: int, uid):
    """Kill the run's process group and, when it has its own uid, every process of that uid: a child that
    called setsid() has left the group, not the uid."""
    with contextlib.suppress(ProcessLookupError):   # the whole group has already exited
        os.killpg(pid, signal.SIGKILL)
    while uid is not None and (pids := processes_of(uid)):
        for leftover in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


def processes_of(uid: int) -> list[int]:
    """Pids of the live (not zombie) processes owned by uid, read from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):   # it exited during the scan
                if entry.stat().st_uid != uid:
                    continue
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
    return pids


def remove_files_of(uid: int):
    """Remove what the run left at the top of the world-writable directories, the only places outside its own
    directory where its uid can write."""
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        for entry in os.scandir(shared) if os.path.isdir(shared) else ():
            with contextlib.suppress(FileNotFoundError):   # another program removed it meanwhile
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
