"""The site's ClientApp tasks are forked from a server that imported them once; the site's
`flwr-clientapp` launches them there as if it ran them itself: same streams, same exit
code, the signals it gets reach the task."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from deploy.clientapp_forkserver import SOCKET_NAME, wait_until_serving
from deploy.launch import flower_env, forkserver_argv, install_site_runner

STARTUP_S = 120.0


@dataclass(frozen=True)
class ServedSite:
    """A site's runtime folder with its `flwr-clientapp`, and the fork server serving it."""

    clientapp: Path
    sockets: Path
    server: subprocess.Popen[bytes]
    env: dict[str, str]

    def launch(self, *arguments: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.clientapp), *arguments], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )


@pytest.fixture(scope="module")
def served_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedSite]:
    sockets = tmp_path_factory.mktemp("a-folder-whose-path-is-longer-than-a-unix-socket-path-may-be-" + "x" * 60)
    folder = install_site_runner(tmp_path_factory.mktemp("state"), sockets)
    env = flower_env(folder)
    server = subprocess.Popen(forkserver_argv(sockets), env=env, stderr=subprocess.PIPE)
    try:
        assert wait_until_serving(sockets, lambda: server.poll() is None, STARTUP_S), server.stderr
        yield ServedSite(folder / "flwr-clientapp", sockets, server, env)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _children(process: subprocess.Popen[bytes]) -> set[int]:
    return {child.pid for child in psutil.Process(process.pid).children()}


def test_the_socket_is_readable_by_the_sites_user_only(served_site: ServedSite) -> None:
    assert (served_site.sockets / SOCKET_NAME).stat().st_mode & 0o777 == 0o600


def test_a_launched_task_writes_to_the_launchers_streams_and_exits_with_its_code(served_site: ServedSite) -> None:
    usage = served_site.launch("--help")
    stdout, _ = usage.communicate(timeout=60)
    assert usage.returncode == 0 and "The site's own ClientApp runner" in stdout


def test_a_task_that_fails_gives_the_launcher_its_exit_code_and_its_error(served_site: ServedSite) -> None:
    failing = served_site.launch("--token", "t", "--no-such-option")
    _, stderr = failing.communicate(timeout=60)
    assert failing.returncode == 2 and "unrecognized arguments: --no-such-option" in stderr


def test_a_signal_to_the_launcher_reaches_its_task_in_the_server(served_site: ServedSite, tmp_path: Path) -> None:
    """A task whose runtime API never answers retries until a signal stops it, as Flower's
    would; its handler says so ("Task stopped.") on the launcher's stream."""
    log = tmp_path / "task.log"
    before = _children(served_site.server)
    with log.open("wb") as stream:
        waiting = subprocess.Popen(
            [str(served_site.clientapp), "--token", "t", "--runtime-api-address", "127.0.0.1:1"],
            env=served_site.env,
            stderr=stream,
        )
    try:
        assert _eventually(lambda: "Connection attempt failed" in log.read_text()), log.read_text()
        assert len(_children(served_site.server) - before) == 1  # the task runs in the server, not the launcher
        waiting.send_signal(signal.SIGTERM)
        assert _eventually(lambda: "Task stopped." in log.read_text()), log.read_text()
    finally:  # Flower's own exit after "Task stopped." may take its time: not what is tested here
        for process in psutil.Process(served_site.server.pid).children():
            if process.pid not in before:
                process.kill()
        waiting.kill()
        waiting.wait(timeout=60)


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_launcher_gone_right_after_asking_leaves_the_server_serving(
    served_site: ServedSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launcher killed between its request and its task's pid must not stop the site."""
    request = json.dumps(["--help"]).encode()
    with (tmp_path / "out").open("wb") as out:
        asking = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        monkeypatch.chdir(served_site.sockets)  # the folder's path is longer than a socket's may be
        asking.connect(SOCKET_NAME)
        socket.send_fds(asking, [struct.pack("!i", len(request)) + request], [0, out.fileno(), out.fileno()])
        asking.close()
    usage = served_site.launch("--help")
    stdout, _ = usage.communicate(timeout=60)
    assert usage.returncode == 0 and "The site's own ClientApp runner" in stdout
    assert served_site.server.poll() is None


def test_without_its_server_the_sites_clientapp_says_how_to_start_one(tmp_path: Path) -> None:
    folder = install_site_runner(tmp_path / "state", tmp_path / "sockets")
    result = subprocess.run(
        [str(folder / "flwr-clientapp"), "--help"],
        env=flower_env(folder),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    expected = (
        f"error: the site's ClientApp fork server does not answer at {tmp_path / 'sockets' / SOCKET_NAME} "
        "(No such file or directory); start the site with `cohort supernode`, which runs it"
    )
    assert result.stderr.strip().splitlines() == [expected]
