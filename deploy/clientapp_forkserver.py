"""A site's ClientApp processes, forked from one that has already imported PyTorch and Opacus.

Flower's SuperExec starts one `flwr-clientapp` process per message a site answers. Each
imported PyTorch, Opacus, scikit-learn and Flower before reading its message: about 8 s
of CPU per message and per site, most of a deployed round. `cohort supernode` now starts
this fork server beside the SuperNode: it imports the site's runner and ClientApp once,
then forks one process per task. The site's `flwr-clientapp` is a small launcher that
hands the server its arguments and its standard streams, forwards the signals it gets,
and exits with the task's exit code, so SuperExec sees what it saw before.

What a task shares with the server is code and nothing else: the server never reads the
site's data, keys or ledger, nor opens a connection; each task is a fresh process that
does all of that itself and dies with it. Its noise is drawn from the operating system's
CSPRNG (client/dp_randomness.py), which a fork does not copy. The server listens on a
Unix socket in a private folder `cohort supernode` makes for each start (owner-only, out
of the state directory, which holds state and is what the operator backs up) and serves
only processes of its own user. The code a task runs is the code the server
loaded: upgrading Cohort on a site's host takes effect when the site restarts.

Only the standard library is imported at module level: the launcher runs once per task
and must start in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from deploy.flower_runtime import die_with_parent

# The socket's name in its folder (bound and dialled by this relative name: paths of Unix
# sockets are limited to 107 bytes, a temporary folder's path is not).
SOCKET_NAME = "clientapp.sock"
# The launcher's arguments, as JSON, are at most this long.
MAX_REQUEST_BYTES = 64 * 1024
# How long the server waits for a connected launcher's request before dropping it: one
# stuck peer must not hold the only thread that forks.
REQUEST_TIMEOUT_S = 5.0
# How often the server looks whether its parent (`cohort supernode`) is still there.
_PARENT_CHECK_S = 1.0
_STANDARD_STREAMS = (0, 1, 2)
_INT = struct.Struct("!i")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ForkServerUnavailable(Exception):
    """The launcher cannot reach the fork server (the site is stopping or was not started by `cohort supernode`)."""


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Work in folder for a moment: binds and connects use the socket's short relative name."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return data


def launch(socket_dir: Path, arguments: list[str]) -> int:
    """Run one task in the fork server with this process's standard streams; returns its
    exit code. SIGTERM, SIGINT and SIGHUP sent to this process reach the task."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _inside(socket_dir):
            connection.connect(SOCKET_NAME)
    except OSError as error:
        raise ForkServerUnavailable(
            f"the site's ClientApp fork server does not answer at {socket_dir / SOCKET_NAME} ({error.strerror}); "
            "start the site with `cohort supernode`, which runs it"
        ) from None
    forwarder = _SignalForwarder()
    for signum in _FORWARDED_SIGNALS:
        signal.signal(signum, forwarder.received)
    with connection:
        request = json.dumps(arguments).encode()
        socket.send_fds(connection, [_INT.pack(len(request)) + request], list(_STANDARD_STREAMS))
        try:
            forwarder.started(_INT.unpack(_receive_exactly(connection, _INT.size))[0])
        except ConnectionError:
            raise ForkServerUnavailable("the site's ClientApp fork server refused the task; its log says why") from None
        try:
            return _INT.unpack(_receive_exactly(connection, _INT.size))[0]
        except ConnectionError:
            return 1  # the server stopped: the task got SIGTERM with it


@dataclass
class _SignalForwarder:
    """Signals the launcher gets go to its task; those that come before the task's pid
    does are held until it comes, so that none is lost and none stops the launcher alone."""

    task: int | None = None
    held: list[int] = field(default_factory=list)

    def received(self, signum: int, frame: FrameType | None) -> None:
        if self.task is None:
            self.held.append(signum)
        else:
            _forward(self.task, signum)

    def started(self, task: int) -> None:
        self.task = task
        for signum in self.held:
            _forward(task, signum)


def _forward(task: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(task, signum)


@dataclass
class ForkServer:
    """Accept launchers on the socket, fork one task each, and tell each launcher its task's
    pid, then its exit code. Single-threaded, so that a fork never copies a lock another
    thread holds."""

    listener: socket.socket
    run_task: Callable[[list[str]], int]
    parent: int = field(default_factory=os.getppid)
    waiting: dict[int, socket.socket] = field(default_factory=dict)
    stopping: bool = False
    # Where the signal handler's C half writes, so that select() returns at once on
    # SIGCHLD (a task ended) and SIGTERM: both ends live as long as the server.
    wakeup: tuple[socket.socket, socket.socket] = field(default_factory=socket.socketpair)

    def serve(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a task's end wakes the loop below
        woken, written = self.wakeup
        for end in self.wakeup:
            end.setblocking(False)
        signal.set_wakeup_fd(written.fileno())
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        selector.register(woken, selectors.EVENT_READ)
        while not self.stopping and os.getppid() == self.parent:
            for key, _ in selector.select(timeout=_PARENT_CHECK_S):
                if key.fileobj is self.listener and not self.stopping:
                    self._accept()
                elif key.fileobj is woken:
                    with contextlib.suppress(BlockingIOError):
                        woken.recv(4096)
            self._reap()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            request = self._request(connection)
        except (OSError, ValueError, ConnectionError) as error:
            print(f"error: the ClientApp fork server dropped a request: {error}", file=sys.stderr, flush=True)
            request = None
        if request is None:
            connection.close()
            return
        arguments, streams = request
        try:
            self.waiting[self._fork(arguments, streams, connection)] = connection
        finally:
            for stream in streams:
                os.close(stream)

    def _request(self, connection: socket.socket) -> tuple[list[str], list[int]] | None:
        """The launcher's arguments and standard streams, from a process of this user only;
        None for a connection closed without a request (wait_until_serving's probe)."""
        connection.settimeout(REQUEST_TIMEOUT_S)
        _, uid, _ = _CREDENTIALS.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        first, streams, _, _ = socket.recv_fds(connection, _INT.size + MAX_REQUEST_BYTES, len(_STANDARD_STREAMS))
        if not first and not streams:
            return None
        if uid != os.getuid() or len(streams) != len(_STANDARD_STREAMS):
            for stream in streams:
                os.close(stream)
            raise ValueError(f"a process of uid {uid} sent {len(streams)} streams; only this user's launcher is served")
        data = first
        while len(data) < _INT.size:
            data += _receive_exactly(connection, _INT.size - len(data))
        size = _INT.unpack(data[: _INT.size])[0]
        if not 0 < size <= MAX_REQUEST_BYTES:
            raise ValueError(f"a request of {size} bytes")
        body = data[_INT.size :] + _receive_exactly(connection, size - (len(data) - _INT.size))
        arguments = json.loads(body)
        if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
            raise ValueError("the arguments are not a list of strings")
        return arguments, streams

    def _fork(self, arguments: list[str], streams: list[int], connection: socket.socket) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        task = os.fork()
        if task == 0:
            self._become_task(arguments, streams)
        with contextlib.suppress(OSError):  # a launcher gone since it asked: its task still runs, and is reaped
            connection.sendall(_INT.pack(task))
        return task

    def _become_task(self, arguments: list[str], streams: list[int]) -> None:
        """In the child: drop everything of the server, take the launcher's streams, run the
        task, and exit with its code without returning into the server's loop."""
        code = 1
        try:
            die_with_parent()
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            self.listener.close()
            for end in self.wakeup:
                end.close()
            for connection in self.waiting.values():
                connection.close()
            for target, stream in zip(_STANDARD_STREAMS, streams, strict=True):
                os.dup2(stream, target)
            code = self.run_task(arguments)
        except BaseException:  # noqa: BLE001 - said on the launcher's stream; the server's loop must never resume here
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while self.waiting:
            try:
                task, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if task == 0:
                return
            connection = self.waiting.pop(task, None)
            if connection is not None:
                with contextlib.suppress(OSError):
                    connection.sendall(_INT.pack(os.waitstatus_to_exitcode(status)))
                connection.close()


def run_site_runner(arguments: list[str]) -> int:
    """One task: what `python -m client.site_runner ARGUMENTS` would do, in this process."""
    from client import site_runner

    sys.argv = ["flwr-clientapp", *arguments]
    try:
        site_runner.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def serve(socket_dir: Path) -> None:
    """Import the site's runner and ClientApp once, then serve launchers until SIGTERM,
    SIGINT or the end of `cohort supernode`."""
    import client.app
    import client.site_runner  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _inside(socket_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME)  # left by a server that was killed: the state directory's lock is ours
        listener.bind(SOCKET_NAME)
        os.chmod(SOCKET_NAME, 0o600)
    listener.listen(64)
    listener.setblocking(False)
    ForkServer(listener, run_site_runner).serve()


def wait_until_serving(socket_dir: Path, alive: Callable[[], bool], timeout_s: float) -> bool:
    """True once the server accepts connections; False if it stops or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _inside(socket_dir):
                probe.connect(SOCKET_NAME)
            return True
        except OSError:
            time.sleep(0.2)
        finally:
            probe.close()
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description="The site's ClientApp fork server and its launcher (Cohort)")
    parser.add_argument("role", choices=("serve", "launch"))
    parser.add_argument("socket_dir", type=Path)
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="launch: the arguments of flwr-clientapp")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.socket_dir)
        return
    try:
        sys.exit(launch(args.socket_dir, args.arguments))
    except ForkServerUnavailable as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
