"""Joining a Ray cluster without hanging: probe the address before `ray.init`.

`ray.init(address=...)` where nothing listens retries for minutes and prints C++ warnings
(FIELD-NOTES: `--address 127.0.0.1:1`); where something else listens it waits on a handshake
that never comes. The probe opens a TCP connection and sends the HTTP/2 connection preface; a
Ray GCS (or Ray Client server), being gRPC, answers with a SETTINGS frame at once. Each step is
bounded, so a bad address fails within ~2 x PROBE_TIMEOUT_S with one line naming it.
"""

from __future__ import annotations

import re
import socket
from contextlib import contextmanager

from simdist.config import ConfigError

PROBE_TIMEOUT_S = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_ADDRESS = re.compile(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)/?")


def address_key(explicit: str | None) -> str:
    """The input that named the address: the --address flag, else the environment."""
    return "--address" if explicit else "RAY_ADDRESS"


def probe(address: str, key: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ConfigError(key) unless a gRPC server answers at `address` ("host:port" or
    "ray://host:port"). Addresses Ray resolves itself ("auto", "local") are left to Ray."""
    m = _ADDRESS.fullmatch(address.strip())
    if address.strip() in ("auto", "local"):
        return
    if m is None:
        raise ConfigError(key, f"cannot parse Ray address {address!r}; expected host:port "
                               "(e.g. 10.0.0.1:6379) or ray://host:port")
    host, port = m.group("host").strip("[]"), int(m.group("port"))
    hint = ("check --address" if key == "--address" else "check RAY_ADDRESS, or unset it to "
            "start a local Ray")
    if not 0 < port < 65536:
        raise ConfigError(key, f"Ray address {address!r}: port {port} is not in 1..65535")
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.timeout:
        raise ConfigError(key, f"no Ray cluster at {address}: no answer within {timeout_s:g} s; "
                               f"{hint}") from None
    except OSError as e:
        raise ConfigError(key, f"no Ray cluster at {address}: {e.strerror or e}; {hint}") from None
    try:
        sock.settimeout(timeout_s)
        sock.sendall(_H2_PREFACE)
        head = sock.recv(9)
    except OSError as e:
        head = b""
        why = "no answer within" if isinstance(e, socket.timeout) else f"{e.strerror or e} within"
    else:
        why = "no gRPC answer within"
    finally:
        sock.close()
    if len(head) < 4 or head[3] != 0x04:  # not an HTTP/2 SETTINGS frame: not Ray
        raise ConfigError(key, f"no Ray cluster at {address}: something listens there but it is "
                               f"not Ray ({why} {timeout_s:g} s); {hint}")


@contextmanager
def keep_signal_handlers():  # noqa: ANN201
    """Keep the caller's Python SIGTERM handler across `ray.init`, which replaces it (with
    sys.exit, and its C++ core worker with a stack dump: '*** SIGTERM received ...'). Only a
    handler the caller installed is put back; without one, Ray's own handling stays."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(before):
            signal.signal(signal.SIGTERM, before)


JOIN_ATTEMPTS = 10  # ray.init's GCS connect attempts (~1 s each; Ray's default is 20)


@contextmanager
def bounded_join():  # noqa: ANN201
    """Around `ray.init(address=...)`: at most JOIN_ATTEMPTS connect attempts (unless the user set
    RAY_gcs_server_port_wait_time_s), and the C++ core's retry warnings, which it writes to file
    descriptor 2 while it connects, kept off our stderr (the failure is reported in one line)."""
    import os
    import sys
    import tempfile

    env = "RAY_gcs_server_port_wait_time_s"
    set_env = env not in os.environ
    if set_env:
        os.environ[env] = str(JOIN_ATTEMPTS)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if set_env:
                os.environ.pop(env, None)


@contextmanager
def native_stderr_kept_apart(enabled: bool = True):  # noqa: ANN201
    """While inside: what Ray's C++ core writes to file descriptor 2 (its own log lines, e.g.
    "task_manager.cc: Failed to push error to driver" when a node dies) goes to a temporary
    file, while Python's sys.stderr keeps writing where stderr went; so a failure is the one
    line simdist prints. `enabled=False` (--debug): everything stays on stderr."""
    import os
    import sys
    import tempfile

    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr: nothing to separate
        fd = None
    if fd != 2:
        yield
        return
    saved = os.dup(2)
    old = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=old.encoding,  # noqa: SIM115
                          errors=old.errors)
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = old
            os.dup2(saved, 2)
            os.close(saved)
