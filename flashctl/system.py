"""Small pieces of the operating system every layer needs, each implemented once: temporary
environment variables, termination signals as KeyboardInterrupt, free TCP ports.

Standard library only: importing this module costs nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (child processes started inside it
    inherit them); the old values, or their absence, come back afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def signals_interrupt(*signums: int) -> Iterator[None]:
    """Inside the block, the given signals (default SIGTERM) raise KeyboardInterrupt like Ctrl-C,
    so the clean-up a `finally` or `except KeyboardInterrupt` does runs on `kill` too (SIGTERM,
    a closed terminal's SIGHUP) instead of the process dying with its children orphaned or its
    files half-written. Only in the main thread (elsewhere Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {sig: signal.signal(sig, handler) for sig in (signums or (signal.SIGTERM,))}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it). Another process may take
    it before the caller binds it: use it for a rendezvous or server started right away."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False
