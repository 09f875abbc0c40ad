"""The coordinator's front door: the one address sites reach, serving Flower's Fleet API
and nothing else.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port, and
its Control API (`flwr run`, `flwr ls`, `flwr supernode register`) has no user
authentication without Flower's enterprise add-on. So the SuperLink listens on the
coordinator's loopback, and nginx (Debian's package) listens on the public port with the
SuperLink's certificate and forwards exactly the routes of Flower's Fleet router; any
other request gets 403 from nginx and never reaches Flower. SuperNode authentication is
untouched: its signature headers travel through as they are, and the SuperLink checks them.

nginx runs in the foreground with a configuration Cohort writes into a private directory
of its own (not /etc/nginx), so it needs no root and leaves nothing behind.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import CohortInputError
from deploy.certificates import LOOPBACK, LOOPBACK_NAME, CertificateLayout
from deploy.fleet_limits import OBJECT_ROUTE, FleetLimits

# What nginx answers to every request that is not a Fleet API call.
REFUSAL = "refused: this address serves only Flower's Fleet API; run flwr on the coordinator's host"
# A busy SuperLink may take long to answer a large push or pull; nginx's default is 60 s.
PROXY_TIMEOUT_S = 600
# A client that has not sent its request line and headers within this, or pauses longer
# between two reads of its body, is dropped (nginx's defaults are 60 s): a connection that
# sends nothing holds one of nginx's slots and never reaches a per-address limit.
CLIENT_TIMEOUT_S = 15
# Client and upstream connections together: 100 sites each holding four requests in
# flight and four idle keep-alive connections use 1,200.
WORKER_CONNECTIONS = 4096
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def fleet_routes() -> list[str]:
    """The paths of Flower's own Fleet router, read from the installed Flower, so that the
    front door follows Flower's API instead of a list copied by hand."""
    from flwr.superlink.routers.fleet.router import router  # imported here: it loads FastAPI

    return [route.path for route in router.routes]  # type: ignore[attr-defined]


def nginx_executable() -> str:
    """Debian's nginx (package nginx-light or nginx; `make test` installs it when root),
    found on PATH like every program an operator names."""
    found = shutil.which("nginx")
    if found is None:
        raise CohortInputError(
            "nginx is not on PATH, and the front door needs it: install Debian's package "
            "(`apt-get install nginx-light`), add its folder (/usr/sbin) to PATH, or use the Cohort Docker image"
        )
    return found


@dataclass(frozen=True)
class FrontDoor:
    """nginx on host:port, with the SuperLink's certificate, forwarding the Fleet API to
    the SuperLink at upstream_host:upstream_port (verified against ca.crt) and refusing
    everything else.

    certs: the directory of `cohort certs init` (ca.crt, superlink.crt, superlink.key).
    limits: what one client address may send (deploy/fleet_limits.py).
    """

    certs: Path
    host: str
    port: int
    upstream_host: str
    upstream_port: int
    limits: FleetLimits = field(default_factory=FleetLimits)

    @property
    def upstream_name(self) -> str:
        """The name the SuperLink's certificate is checked against: nginx matches DNS names
        only, so the loopback address is checked as `localhost` (every certificate of
        `cohort certs init` covers both) and another address cannot be checked at all."""
        if self.upstream_host == LOOPBACK:
            return LOOPBACK_NAME
        try:
            ipaddress.ip_address(self.upstream_host.strip("[]"))
        except ValueError:
            return self.upstream_host
        raise CohortInputError(
            f"--upstream {self.upstream_host}: the front door checks the SuperLink's certificate by name; "
            "give a DNS name its certificate covers (or 127.0.0.1)"
        )

    def config(self, directory: Path) -> str:
        """nginx.conf for a private directory: pid file, temporary files and everything
        nginx writes stay in it; errors go to stderr, which `cohort superlink` passes on
        (a request refused for its size or rate is one; a body spilled to a temporary
        file, every push of a model chunk, is a warning and not logged)."""
        layout = CertificateLayout(self.certs)
        temp_paths = "\n".join(f"    {name}_temp_path {_quote(directory / name)};" for name in _TEMP_PATHS)
        locations = "\n".join(self._location(route) for route in fleet_routes())
        # As root, nginx would run its workers as a system user that cannot read the
        # private directory; they run as the user who started it instead.
        user = f"user {_quote(pwd.getpwuid(os.geteuid()).pw_name)};\n" if os.geteuid() == 0 else ""
        limits = self.limits
        return f"""{user}daemon off;
worker_processes 1;
worker_rlimit_nofile {2 * WORKER_CONNECTIONS};
pid {_quote(directory / "nginx.pid")};
error_log stderr error;
events {{ worker_connections {WORKER_CONNECTIONS}; }}
http {{
    access_log off;
    server_tokens off;
{temp_paths}
    # Per client address (deploy/fleet_limits.py): requests in flight, object pushes in
    # flight, and a request rate with a burst. 503 is what Flower's SuperNode retries.
    limit_conn_zone $binary_remote_addr zone=fleet_connections:10m;
    limit_conn_zone $binary_remote_addr zone=fleet_objects:10m;
    limit_req_zone $binary_remote_addr zone=fleet_requests:10m rate={limits.requests_per_second_per_address}r/s;
    limit_conn_status 503;
    limit_req_status 503;
    client_header_timeout {CLIENT_TIMEOUT_S}s;
    client_body_timeout {CLIENT_TIMEOUT_S}s;
    upstream superlink {{ server {_address(self.upstream_host, self.upstream_port)}; }}
    server {{
        listen {_address(self.host, self.port)} ssl;
        ssl_certificate {_quote(layout.server_cert)};
        ssl_certificate_key {_quote(layout.server_key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        default_type text/plain;
        limit_conn fleet_connections {limits.connections_per_address};
        limit_req zone=fleet_requests burst={limits.burst_per_address} nodelay;
        # To the SuperLink, whose certificate is checked against ca.crt. nginx reads a
        # request's whole body (to a temporary file past 16 KiB) before the SuperLink sees
        # any of it, so a slow or oversized upload never reaches the SuperLink.
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_quote(layout.ca_cert)};
        proxy_ssl_name {self.upstream_name};
        proxy_ssl_server_name on;
        proxy_request_buffering on;
        proxy_buffering off;
        proxy_read_timeout {PROXY_TIMEOUT_S}s;
        proxy_send_timeout {PROXY_TIMEOUT_S}s;

        # Flower's Fleet API, route by route, each matched exactly (a regex ending in `$`
        # also matches before a trailing newline) and bounded by what it legitimately carries.
{locations}
        # The Control API, the Runtime API, Flower's docs and anything else.
        location / {{ return 403 "{REFUSAL}\\n"; }}
    }}
}}
"""

    def _location(self, route: str) -> str:
        """One Fleet route: POST only, with its own body limit; the normalised path is what
        goes upstream. push-object also counts against the object pushes in flight (a
        location that sets limit_conn inherits none from its server)."""
        object_pushes = (
            f"\n            limit_conn fleet_connections {self.limits.connections_per_address};"
            f"\n            limit_conn fleet_objects {self.limits.object_pushes_per_address};"
            if route == OBJECT_ROUTE
            else ""
        )
        return f"""        location = {route} {{
            limit_except POST {{ deny all; }}
            client_max_body_size {self.limits.body_limit(route)};{object_pushes}
            proxy_pass https://superlink$uri;
        }}"""

    def prepare(self, directory: Path) -> list[str]:
        """Write the configuration into `directory` and have nginx check it (`nginx -t`:
        certificates load, the upstream resolves); returns the command that runs it."""
        nginx = nginx_executable()
        for name in _TEMP_PATHS:
            (directory / name).mkdir(mode=0o700, exist_ok=True)
        config = directory / "nginx.conf"
        config.write_text(self.config(directory), encoding="utf-8")
        config.chmod(0o600)
        argv = [nginx, "-e", "stderr", "-p", str(directory), "-c", str(config)]
        checked = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False)
        if checked.returncode != 0:
            problem = next((line for line in checked.stderr.splitlines() if "[emerg]" in line), checked.stderr.strip())
            raise CohortInputError(
                f"nginx refused the front door's configuration ({problem.strip()}); fix what it names and start again"
            )
        return argv


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(path: Path | str) -> str:
    """A path as one nginx token, whatever characters it holds."""
    text = str(path)
    if '"' in text or "\\" in text or "$" in text:
        raise CohortInputError(
            f"{text} contains a quote, backslash or '$', which nginx cannot take in a path; use another directory"
        )
    return f'"{text}"'
