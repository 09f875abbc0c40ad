"""The coordinator's side of a deployment: Flower's SuperLink, and the front door that
is the only thing sites reach.

Everything is checked before anything starts (certificates, database folder, both ports,
nginx and the configuration it will run), so a mistake is one line and exit 2 with
nothing left running. Then the SuperLink starts, the front door starts once the
SuperLink answers, and both are supervised together.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import CohortInputError
from deploy.certificates import CertificateLayout, check_server_files
from deploy.commands import shell_line
from deploy.flower_runtime import install_flower_launchers, offline_flower_env
from deploy.front_door import FrontDoor
from deploy.launch import SuperLinkLaunch, flwr_home, require_free_port, wait_until_healthy
from deploy.supervision import Program, Supervisor

SUPERLINK_STARTUP_S = 120.0


@dataclass(frozen=True)
class CoordinatorLaunch:
    """superlink: Flower's SuperLink, or None where it runs elsewhere (docker/compose.yml
    runs it in a container of its own); front_door: the nginx front door, or None where
    it runs elsewhere."""

    superlink: SuperLinkLaunch | None
    front_door: FrontDoor | None

    def check(self) -> None:
        if self.superlink is not None:
            self.superlink.check()
        if self.front_door is not None:
            check_server_files(self.front_door.certs, (self.front_door.upstream_name,))
            require_free_port(self.front_door.host, self.front_door.port, "--port")

    def run(self) -> int:
        """Check, start and supervise; returns the exit code (0 after SIGTERM or Ctrl-C)."""
        self.check()
        with tempfile.TemporaryDirectory(prefix="cohort-coordinator-") as private:
            launchers = install_flower_launchers(Path(private) / "bin")
            programs: list[Program] = []
            if self.superlink is not None:
                programs.append(Program("flower-superlink", self.superlink.argv(launchers), self._wait_for_superlink))
            if self.front_door is not None:
                programs.append(Program("the front door (nginx)", self.front_door.prepare(Path(private))))
            for program in programs:
                print(f"starting {program.name}:\n{shell_line(program.argv)}", file=sys.stderr)
            return Supervisor(offline_flower_env(flwr_home(), launchers)).run(programs)

    def _wait_for_superlink(self, process: subprocess.Popen[bytes]) -> None:
        """The front door starts only once the SuperLink answers behind it."""
        assert self.superlink is not None
        address = self.superlink.local_address
        if not wait_until_healthy(
            address, CertificateLayout(self.superlink.certs).ca_cert, process, SUPERLINK_STARTUP_S
        ):
            if process.poll() is not None:
                raise CohortInputError(
                    f"flower-superlink exited with code {process.returncode} "
                    f"before it answered on {address}; its log is above"
                )
            raise CohortInputError(
                f"flower-superlink did not answer on {address} within {SUPERLINK_STARTUP_S:.0f} s; its log is above"
            )
