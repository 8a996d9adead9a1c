"""A process is alive until its last thread is gone."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from deploy import processes

# The main thread leaves first (pthread_exit), as one may when a service exits; another
# thread still holds a listening socket for a moment.
LAST_THREAD_HOLDS_A_PORT = """
import ctypes, socket, sys, threading, time
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
threading.Thread(target=time.sleep, args=(3,)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_left_first_is_alive_while_a_thread_runs() -> None:
    """Its main thread then reads as a zombie while the process still holds its ports:
    stop_pid took it for gone, and `make up` restarting a service found its port taken."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LAST_THREAD_HOLDS_A_PORT], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # still listening
    assert processes.pid_alive(proc.pid)
    proc.wait(10)
    proc.stdout.close()
    assert not processes.pid_alive(proc.pid)
