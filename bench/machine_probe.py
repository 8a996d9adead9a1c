"""Two quick probes that tell one day's machine from another's.

On 2026-11-28 the same code gave about half of every benchmark figure of 2026-11-24
(1.6-2.4x the CPU per event end to end, half the backtesting rate), and the same
pure-Python loop ran 60 % slower at one moment than half an hour earlier: the host's speed
varies. Recording these two figures with every run (a process wake-up round trip, the
pipeline's way of handing work between processes; and the interpreter's speed) lets runs
from different days be compared, or at least be told apart.
"""

from __future__ import annotations

import os
import socket
import time
import timeit


def wakeup_rtt_us(round_trips: int = 5_000) -> float:
    """Mean µs for one byte to go to a child process and back."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: echo
        a.close()
        try:
            for _ in range(round_trips):
                b.recv(1)
                b.send(b"y")
        finally:
            os._exit(0)
    b.close()
    try:
        started = time.perf_counter()
        for _ in range(round_trips):
            a.send(b"x")
            a.recv(1)
        return (time.perf_counter() - started) / round_trips * 1e6
    finally:
        a.close()
        os.waitpid(pid, 0)


def python_loop_us() -> float:
    """Best of 5: µs for `sum(range(1000))`, the interpreter's raw speed."""
    best = min(timeit.repeat("sum(range(1000))", number=5_000, repeat=5))
    return best / 5_000 * 1e6


if __name__ == "__main__":
    print(f"wakeup_rtt_us={wakeup_rtt_us():.1f} python_loop_us={python_loop_us():.2f}")
