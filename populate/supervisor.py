"""Several workers on one GPU: ``neureg worker --per-gpu K`` runs K ordinary worker processes.

Why processes and not threads: each worker needs its own CUDA context and its own database connection,
and a crash or kill of one must not take the others down. The database's job reservations already keep
the K workers from computing the same key, so the supervisor only starts them, forwards SIGTERM/SIGINT
(each child then puts its running job back) and waits. Small networks leave most of a GPU idle between
kernel launches; K processes fill it. A ResNet18 step captured as a CUDA graph already keeps a GPU busy,
so K > 1 gains nothing there (docs/gpu.md has the measurement); it pays for narrower networks and for
eager (uncaptured) work. NVIDIA MPS
(``nvidia-cuda-mps-control -d`` before starting) lets the K contexts run kernels concurrently instead of
time-slicing; see the README.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def child_argv(argv: list[str]) -> list[str]:
    """The worker's own command line without ``--per-gpu K`` (both spellings)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--per-gpu":
            skip = True
            continue
        if arg.startswith("--per-gpu="):
            continue
        out.append(arg)
    return out


def run_copies(argv: list[str], copies: int) -> int:
    """Start ``copies`` workers with ``argv`` (neureg's arguments), forward signals, return the worst status."""
    command = [
        sys.executable,
        "-c",
        "import sys; from neureg.cli import main; sys.exit(main(sys.argv[1:]))",
        *child_argv(argv),
    ]
    children = [subprocess.Popen(command) for _ in range(copies)]

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max(codes, key=lambda code: (code != 0, abs(code)))
