"""`python sae_core/jobwrap.py --exit-file FILE -- CMD ...`: run CMD (torchrun) and record how it ended.

The launcher starts every job through this wrapper. A launcher that restarts is no
longer the job's parent and cannot wait() for it; the exit code written here is how
it still learns whether an adopted job completed or failed.

Standard library only, run by path (not -m) so it starts without importing the package.
The wrapper forwards SIGTERM/SIGINT/SIGHUP to its child and exits with the child's code
(128 + N when the child died of signal N, as a shell would).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time


def write_exit_file(path: str, exit_code: int, child_pid: int | None) -> None:
    # Written to a temporary name and renamed, so a reader never sees half a file.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"exit_code": exit_code, "pid": child_pid, "finished_at": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 4 or argv[0] != "--exit-file" or argv[2] != "--":
        print("usage: jobwrap.py --exit-file FILE -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    exit_file, command = argv[1], argv[3:]

    child: subprocess.Popen | None = None
    pending: list[int] = []  # signals that arrived before the child existed

    def forward(signum, _frame) -> None:
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # Installed before the child starts, so a cancel in that window is not lost.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # nothing a job runs may wait on a prompt
    except OSError as exc:
        print(f"jobwrap: cannot start {command[0]}: {exc}", file=sys.stderr)
        write_exit_file(exit_file, 127, None)
        return 127
    for signum in pending:
        child.send_signal(signum)
    code = child.wait()  # retried on EINTR (PEP 475); the handler only forwards
    write_exit_file(exit_file, code, child.pid)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
