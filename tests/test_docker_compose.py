"""docker/: the image and the compose federation, checked without a Docker engine.

The compose file must run the deployment recipe of deploy/commands.py (the commands that
tests/test_deployment.py runs for real) with only the values filled in, mount exactly the
files `cohort certs` writes, keep each site's key, data, state and budget its own, and let
sites reach the front door alone: the SuperLink shares no network with them and publishes
no port.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click
import pytest
import typer
import yaml

from cli.certs import certs_app
from common.config import validate_budget
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.commands import (
    SUPERLINK_LOCAL_PORT,
    SUPERLINK_PORT,
    certs_init_command,
    certs_site_command,
    connect_command,
    front_door_command,
    private_superlink_command,
    register_command,
    run_command,
    supernode_command,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
CERTS_VOLUME = "certs"
PROGRAMS = ("cohort", "flwr")
# Control operators end a simple command in a shell line.
_OPERATORS = frozenset({";", "&", "&&", "|", "||", "(", ")"})

PASSPHRASE = b"compose test passphrase"

# The recipe, keyed by each command's name (the words before its first placeholder or flag).
# Compose splits the coordinator's side in two containers: the SuperLink on a private network
# and the front door.
RECIPE = {
    "certs init": [*certs_init_command(), "--ca-passphrase-file", "<FILE>"],
    "certs site": certs_site_command(),
    "superlink": private_superlink_command(),
    "front-door": front_door_command(),
    "connect": connect_command(),
    "site register": register_command("<PUBLIC_KEY>"),
    "supernode": supernode_command(),
}


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    subpath: str | None
    read_only: bool


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def services() -> dict[str, dict]:
    return compose()["services"]


def mounts(service: dict) -> list[Mount]:
    """Both of compose's volume syntaxes: 'SOURCE:TARGET[:ro]' and the long mapping."""
    result = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            result.append(Mount(source, target, None, mode == ["ro"]))
        else:
            subpath = (entry.get("volume") or {}).get("subpath")
            result.append(Mount(entry["source"], entry["target"], subpath, bool(entry.get("read_only", False))))
    return result


def script_commands(script: str) -> list[list[str]]:
    """The cohort/flwr commands in a shell script: per line, each simple command from its
    first cohort or flwr word (after a wrapper such as `test -f X ||`) to its end."""
    commands = []
    for line in script.replace("$$", "$").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        simple: list[list[str]] = [[]]
        for token in lexer:
            if token in _OPERATORS:
                simple.append([])
            else:
                simple[-1].append(token)
        for words in simple:
            starts = [index for index, word in enumerate(words) if word in PROGRAMS]
            if starts:
                commands.append(words[starts[0] :])
    return commands


def service_commands(service: dict) -> list[list[str]]:
    """What a service runs: its exec-form command, or each command of its `sh -c` script."""
    command = service.get("command")
    if command is None:
        return []
    assert isinstance(command, list), f"write commands in exec form (a YAML list), not {command!r}"
    if command[:2] == ["sh", "-c"]:
        return script_commands(command[2])
    return [command] if command[0] in PROGRAMS else []


def all_commands() -> list[tuple[str, list[str]]]:
    return [(name, command) for name, service in services().items() for command in service_commands(service)]


def recipe_name(command: list[str]) -> str | None:
    """Which recipe step a command is: the recipe's name words are a prefix of it."""
    for step, recipe in RECIPE.items():
        words = name_words(recipe)
        if command[: len(words)] == words:
            return step
    return None


def name_words(recipe: list[str]) -> list[str]:
    words = []
    for word in recipe:
        if word.startswith(("-", "<")):
            break
        words.append(word)
    return words


def shape(command: list[str], name_length: int) -> tuple[tuple[str, ...], list[str], int]:
    """(program and subcommand, flag names, number of positional arguments); a flag takes
    the next word as its value unless that word is a flag too, and may repeat."""
    flags, positionals, rest = [], 0, command[name_length:]
    index = 0
    while index < len(rest):
        word = rest[index]
        if word.startswith("--"):
            flags.append(word.split("=", 1)[0])
            index += 1 if "=" in word or index + 1 == len(rest) or rest[index + 1].startswith("--") else 2
        else:
            positionals += 1
            index += 1
    return tuple(command[:name_length]), sorted(set(flags)), positionals


def option(command: list[str], flag: str) -> str:
    values = options(command, flag)
    assert len(values) == 1, f"{flag} given {len(values)} times in {shlex.join(command)}"
    return values[0]


def options(command: list[str], flag: str) -> list[str]:
    return [command[index + 1] for index, word in enumerate(command[:-1]) if word == flag]


def site_services() -> dict[str, list[str]]:
    """Each SuperNode service with its `cohort supernode` command."""
    return {name: command for name, command in all_commands() if recipe_name(command) == "supernode"}


def certs_commands(subcommand: str) -> list[list[str]]:
    return [command for _, command in all_commands() if command[:3] == ["cohort", "certs", subcommand]]


def certs_volume_files(service: dict) -> list[str]:
    """Files a service mounts one by one out of the certs volume, relative to it."""
    return [mount.subpath for mount in mounts(service) if mount.source == CERTS_VOLUME and mount.subpath is not None]


def available(service: dict, path: str) -> bool:
    """Whether a path inside the container is a mounted file or lies under a mounted volume."""
    for mount in mounts(service):
        target = PurePosixPath(mount.target)
        if PurePosixPath(path) == target or (mount.subpath is None and target in PurePosixPath(path).parents):
            return True
    return False


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
        ),
    )
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


# ------------------------------------------------------------------------- the compose file


def test_compose_file_parses_as_yaml_with_services_and_volumes():
    assert isinstance(services(), dict) and services()
    assert isinstance(compose()["volumes"], dict)


def test_every_cohort_and_flwr_command_has_the_recipes_subcommand_and_flags():
    for service, command in all_commands():
        step = recipe_name(command)
        assert step is not None, f"{service} runs `{shlex.join(command)}`, which deploy/commands.py does not define"
        length = len(name_words(RECIPE[step]))
        assert shape(command, length) == shape(RECIPE[step], length), (
            f"{service}: `{shlex.join(command)}` differs from the recipe's `{shlex.join(RECIPE[step])}`"
        )


def test_compose_runs_every_step_of_the_recipe():
    steps = {recipe_name(command) for _, command in all_commands()}
    assert set(RECIPE) <= steps


def test_no_recipe_placeholder_is_left_in_a_command():
    for service, command in all_commands():
        assert not [word for word in command if re.search(r"<[A-Z_]+>", word)], (
            f"{service}: `{shlex.join(command)}` keeps a placeholder"
        )


@pytest.mark.parametrize("subcommand", ["init", "site"])
def test_certs_commands_are_accepted_by_the_cohort_certs_cli(subcommand):
    group = typer.main.get_command(certs_app)
    assert certs_commands(subcommand), f"the certs service runs no `cohort certs {subcommand}`"
    for command in certs_commands(subcommand):
        click_command = group.commands[subcommand]  # type: ignore[attr-defined]
        try:
            click_command.make_context(subcommand, command[3:])
        except click.UsageError as error:
            pytest.fail(f"`{shlex.join(command)}` is refused by `cohort certs {subcommand}`: {error}")


def _key_volume(site: str) -> str:
    return f"{site}-keys"


def test_every_file_mounted_out_of_a_volume_is_written_by_cohort_certs(tmp_path):
    """The certs volume holds what `cohort certs init` writes; each site's keys volume what
    that site's `cohort certs site /keys NAME` writes."""
    (init,) = certs_commands("init")
    written = {CERTS_VOLUME: tmp_path / CERTS_VOLUME}
    init_certificates(written[CERTS_VOLUME], options(init, "--superlink-host"), passphrase=PASSPHRASE)
    for command in certs_commands("site"):
        written[_key_volume(command[-1])] = tmp_path / command[-1]
        create_site_key(written[_key_volume(command[-1])], command[-1])
    for name, service in services().items():
        for mount in mounts(service):
            if mount.subpath is not None:
                assert mount.source in written, (
                    f"{name} mounts a file out of {mount.source}, which no `cohort certs` command writes"
                )
                assert (written[mount.source] / mount.subpath).is_file(), (
                    f"{name} mounts {mount.subpath} from {mount.source}, which `cohort certs` does not write"
                )


def test_certs_volume_files_keep_their_layout_inside_the_container():
    """A file mounted at /certs/<its path in the volume> is where the commands and `cohort
    certs check /certs` look for it."""
    for name, service in services().items():
        for mount in mounts(service):
            if mount.source == CERTS_VOLUME and mount.subpath is not None:
                assert mount.target == f"/certs/{mount.subpath}", f"{name} mounts {mount.subpath} at {mount.target}"
                assert mount.read_only, f"{name} mounts {mount.subpath} writable"


def test_every_certificate_file_a_command_names_is_mounted_in_its_service():
    for name, service in services().items():
        for command in service_commands(service):
            step = recipe_name(command)
            if step in ("superlink", "front-door"):
                layout = CertificateLayout(Path(option(command, "--certs")))
                needed = [layout.ca_cert, layout.server_cert, layout.server_key]
            elif step in ("connect", "supernode"):
                needed = [Path(option(command, "--ca-cert"))] + (
                    [Path(option(command, "--auth-key"))] if step == "supernode" else []
                )
            elif step == "register":
                needed = [Path(command[3])]
            else:
                continue
            for path in needed:
                assert available(service, path.as_posix()), (
                    f"{name} runs `{shlex.join(command)}` but {path} is not mounted"
                )


def test_only_the_certs_service_mounts_the_whole_certs_volume_with_the_ca_key():
    for name, service in services().items():
        whole = [mount for mount in mounts(service) if mount.source == CERTS_VOLUME and mount.subpath is None]
        assert bool(whole) == (name == "certs"), f"{name} mounts the whole certs volume"
        assert "ca.key" not in certs_volume_files(service), f"{name} mounts ca.key"


def test_the_ca_key_passphrase_comes_from_a_compose_secret():
    (init,) = certs_commands("init")
    assert option(init, "--ca-passphrase-file") == "/run/secrets/ca-passphrase"
    assert services()["certs"]["secrets"] == ["ca-passphrase"]
    assert compose()["secrets"]["ca-passphrase"]["file"] == "./ca-passphrase.txt"
    assert "docker/ca-passphrase.txt" in (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/ca-passphrase.txt" in (ROOT / ".dockerignore").read_text().splitlines()


def test_each_site_makes_its_own_key_pair_in_a_volume_of_its_own():
    for name, command in site_services().items():
        site = option(command, "--name")
        (maker,) = [key_service for key_service, made in all_commands() if made == certs_site_command("/keys", site)]
        assert mounts(services()[maker]) == [Mount(_key_volume(site), "/keys", None, False)]
        assert services()[maker].get("network_mode") == "none"
        assert services()[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"


def test_each_site_mounts_only_the_ca_certificate_and_its_own_private_key():
    for name, command in site_services().items():
        site = option(command, "--name")
        assert certs_volume_files(services()[name]) == ["ca.crt"], (
            f"{name} mounts more than ca.crt from the certs volume"
        )
        (key,) = [mount for mount in mounts(services()[name]) if mount.source.endswith("-keys")]
        assert key == Mount(_key_volume(site), option(command, "--auth-key"), f"sites/{site}/{site}.key", True)


def test_no_service_but_the_site_and_its_key_maker_mounts_a_sites_private_key():
    for name, service in services().items():
        for mount in mounts(service):
            if mount.source.endswith("-keys") and (mount.subpath is None or mount.subpath.endswith(".key")):
                site = mount.source.removesuffix("-keys")
                assert name in (site, f"{site}-key"), f"{name} mounts {site}'s private key"


def test_every_site_public_key_is_registered_under_its_name_before_its_supernode_starts():
    register = services()["register"]
    registered = {
        command[3]: option(command, "--key") for _, command in all_commands() if recipe_name(command) == "site register"
    }
    for name, command in site_services().items():
        site = option(command, "--name")
        (public,) = [mount for mount in mounts(register) if mount.source == _key_volume(site)]
        assert public.subpath == f"sites/{site}/{site}.pub" and public.read_only
        assert registered.get(site) == public.target, (
            f"{name}'s public key {public.target} is never registered as {site}"
        )
        assert register["depends_on"][f"{site}-key"]["condition"] == "service_completed_successfully"


def test_registration_waits_for_the_certificates_and_a_healthy_superlink():
    superlink, register = services()["superlink"], services()["register"]
    assert superlink["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert register["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert superlink["healthcheck"]["test"]


def test_register_uses_the_connection_that_connect_creates():
    (connect,) = [command for _, command in all_commands() if recipe_name(command) == "connect"]
    for _, command in all_commands():
        if recipe_name(command) == "register":
            assert command[4] == connect[2]


def _covered_service(address: str) -> tuple[str, int]:
    (init,) = certs_commands("init")
    host, _, port = address.rpartition(":")
    assert host in services() and host in options(init, "--superlink-host"), (
        f"{address}: not a compose service the certificate covers"
    )
    return host, int(port)


def test_sites_dial_the_front_door_by_a_name_its_certificate_covers():
    (front_door,) = service_commands(services()["front-door"])
    for command in site_services().values():
        assert _covered_service(option(command, "--superlink")) == ("front-door", int(option(front_door, "--port")))


def test_the_coordinators_flwr_and_the_front_door_reach_the_superlink_on_its_private_port():
    (superlink,) = service_commands(services()["superlink"])
    (front_door,) = service_commands(services()["front-door"])
    (connect,) = [command for _, command in all_commands() if recipe_name(command) == "connect"]
    assert int(option(superlink, "--local-port")) == SUPERLINK_LOCAL_PORT
    for address in (option(connect, "--superlink"), option(front_door, "--upstream")):
        assert _covered_service(address) == ("superlink", SUPERLINK_LOCAL_PORT)


def test_only_the_front_door_publishes_a_port_and_it_is_the_recipes():
    published = {
        name: service["ports"] for name, service in services().items() if service.get("ports") or service.get("expose")
    }
    assert list(published) == ["front-door"]
    (front_door,) = service_commands(services()["front-door"])
    (port,) = published["front-door"]
    host_port, _, container_port = str(port).rpartition(":")
    assert int(container_port) == int(option(front_door, "--port")) == SUPERLINK_PORT
    assert int(host_port) == SUPERLINK_PORT


def test_sites_share_no_network_with_the_superlink_and_its_network_is_internal():
    superlink_networks = set(services()["superlink"]["networks"])
    assert all(compose()["networks"][network].get("internal") is True for network in superlink_networks)
    assert superlink_networks <= set(services()["front-door"]["networks"]) and superlink_networks <= set(
        services()["register"]["networks"]
    )
    for name in site_services():
        assert services()[name]["networks"] and not set(services()[name]["networks"]) & superlink_networks, name


def test_superlink_keeps_its_database_on_a_named_volume():
    service = services()["superlink"]
    (command,) = service_commands(service)
    database = PurePosixPath(option(command, "--database"))
    (mount,) = [mount for mount in mounts(service) if mount.target == str(database.parent)]
    assert mount.source in compose()["volumes"] and not mount.read_only


def test_each_site_has_a_valid_budget_of_its_own():
    budgets = {}
    for name, command in site_services().items():
        epsilon, delta = float(option(command, "--epsilon")), float(option(command, "--delta"))
        validate_budget(epsilon, delta, source=f"compose service {name}")
        budgets[name] = epsilon
    assert len(budgets) == 3
    assert len(set(budgets.values())) == len(budgets), f"sites share a budget: {budgets}"


def test_sites_have_distinct_names_data_and_state_volumes():
    names, data, state = [], [], []
    for service_name, command in site_services().items():
        volumes = {mount.target: mount for mount in mounts(services()[service_name])}
        names.append(option(command, "--name"))
        state.append(volumes[option(command, "--state-dir")].source)
        data.append(volumes[str(PurePosixPath(option(command, "--data")).parent)].source)
    for values in (names, data, state):
        assert len(set(values)) == len(values) == 3, values
    assert not set(data) & set(state)


def test_site_data_is_read_only_and_site_state_is_writable():
    for name, command in site_services().items():
        volumes = {mount.target: mount for mount in mounts(services()[name])}
        assert volumes[str(PurePosixPath(option(command, "--data")).parent)].read_only
        assert not volumes[option(command, "--state-dir")].read_only


def test_every_service_runs_under_an_init_so_signals_reach_flower():
    for name, service in services().items():
        assert service.get("init") is True, name


def test_every_named_volume_a_service_uses_is_declared():
    declared = set(compose()["volumes"])
    for name, service in services().items():
        for mount in mounts(service):
            assert mount.source.startswith((".", "/")) or mount.source in declared, (
                f"{name}: volume {mount.source} is not declared"
            )


# ----------------------------------------------------------------------------- the image


def test_dockerfile_starts_from_python_311_slim():
    froms = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    assert froms == ["python:3.11-slim"]


def test_dockerfile_runs_as_a_non_root_user():
    users = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_disables_runtime_dependency_installation_update_checks_and_telemetry():
    env = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "ENV")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env.split()
    assert "FLWR_DISABLE_UPDATE_CHECK=1" in env.split()
    assert "FLWR_TELEMETRY_ENABLED=0" in env.split()


def test_dockerfile_installs_debians_nginx_for_the_front_door():
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    assert "apt-get install -y --no-install-recommends nginx-light" in runs


def test_dockerfile_installs_cpu_torch_at_the_makefiles_version_by_default():
    args = dict(
        arguments.split("=", 1)
        for keyword, arguments in dockerfile_instructions()
        if keyword == "ARG" and "=" in arguments
    )
    makefile_version = re.search(
        r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE
    )
    assert makefile_version is not None
    assert args["TORCH_VERSION"] == makefile_version.group(1)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    assert {".venv", ".git", "runs", "benchmarks/results"} <= ignored


def test_entrypoint_runs_a_role_as_a_cohort_subcommand_and_a_program_as_itself():
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"

    def entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(DOCKER / "entrypoint.sh"), *args],
            check=False,
            capture_output=True,
            text=True,
            env={"PATH": path},
            timeout=120,
        )

    role = entrypoint("certs", "--help")
    assert role.returncode == 0 and "cohort certs" in role.stdout, role.stderr
    program = entrypoint("python", "-c", "print('as itself')")
    assert program.returncode == 0 and program.stdout == "as itself\n", program.stderr


# ----------------------------------------------------------------------------- the README


def test_readme_submits_runs_with_the_recipes_flwr_run():
    blocks = re.findall(
        r"^```(?:sh|bash|shell)\n(.*?)^```",
        (DOCKER / "README.md").read_text(encoding="utf-8"),
        re.MULTILINE | re.DOTALL,
    )
    shell = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    lines = "\n".join(line for line in shell.splitlines() if "flwr run" in line)
    runs = [command for command in script_commands(lines) if command[:2] == ["flwr", "run"]]
    assert runs, "docker/README.md shows no `flwr run`"
    length = len(name_words(run_command()))
    for command in runs:
        assert shape(command, length) == shape(run_command(), length), shlex.join(command)
