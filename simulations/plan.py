"""A simulation plan: the run config plus how many simulated sites and what each gets.

Built from a simulation TOML file (simulations/*.toml) and `--set key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RANGE, SEEDED_NOISE, check_ranges, number
from common.errors import CohortInputError
from server.run_config import RunConfig, refuse_unknown_settings, run_settings
from simulations.attack_spec import AttackSpec
from simulations.ray_cluster import check_ray_address

SIMULATIONS_DIR = Path(__file__).resolve().parent
DEFAULT_SIMULATION = SIMULATIONS_DIR / "default.toml"
PLAN_FILE = "simulation.json"


@dataclass(frozen=True)
class SimulationPlan:
    """run: the coordinator's run config.
    num_sites: simulated sites (Flower SuperNodes), one data partition each; the audit's
        canary clients (audit-canary-clients) come on top.
    cpus_per_site, gpus_per_site: Ray resources for each site's ClientApp; with 2 cores
        and 1 CPU a site, two sites train at a time.
    attack: hostile sites (simulations/attacks.py), or None for an honest federation.
    ray_address: an existing Ray cluster the sites run on: its head's HOST:PORT, or 'auto'
        on one of its nodes; empty, a Ray of the simulation's own on this machine
        (simulations/ray_cluster.py).
    """

    run: RunConfig
    num_sites: int = number(5, 1, 100_000)
    cpus_per_site: int = number(1, 1, 1024)
    gpus_per_site: float = number(0.0, 0, 1024)
    attack: AttackSpec | None = None
    ray_address: str = ""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_ray_address(self.ray_address)
        if self.attack is not None and self.run.data.audit_canary_clients:
            raise CohortInputError(
                "attack and audit-canary-clients each bend the sites' ClientApp their own way; run them apart "
                "(set audit-canary-clients = 0 or drop the attack)"
            )
        self.run.refuse_federation_size(
            min(
                self.num_sites,
                max(int(self.num_sites * self.run.aggregation.fraction_train), self.run.aggregation.min_sites),
            )
        )

    def federation_config(self) -> str:
        """Flower's simulation: the sites, then the audit's canary clients (server/canary_clients.py)."""
        return (
            f"num-supernodes={self.num_sites + self.run.data.audit_canary_clients} "
            f"client-resources-num-cpus={self.cpus_per_site} "
            f"client-resources-num-gpus={self.gpus_per_site}"
        )

    def to_json(self) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "num-sites": self.num_sites,
            "cpus-per-site": self.cpus_per_site,
            "gpus-per-site": self.gpus_per_site,
        }
        if self.attack is not None:
            plan["attack"] = self.attack.to_json()
        if self.ray_address:
            plan["ray-address"] = self.ray_address
        return plan


def load_plan(config_file: Path, overrides: list[str]) -> SimulationPlan:
    values = _read_toml(config_file)
    values.update(parse_overrides(overrides))
    return plan_from_values(values)


# What a simulation TOML or --set may say beyond the run settings.
SIMULATION_SETTINGS = frozenset(
    {"num-sites", "cpus-per-site", "gpus-per-site", "attack", "attack-sites", "attack-scale", "ray-address"}
)


def plan_from_values(values: dict[str, Any]) -> SimulationPlan:
    """A plan from flat settings. A simulation's noise is seeded unless it asks for the
    secure source, so that the same seed gives the same run."""
    refuse_unknown_settings(values, run_settings() | SIMULATION_SETTINGS)
    values = {"noise-source": SEEDED_NOISE, **values}
    plan_values: dict[str, Any] = {}
    for item in dataclasses.fields(SimulationPlan):
        key = item.name.replace("_", "-")
        if RANGE in item.metadata and key in values:
            plan_values[item.name] = _plan_number(key, values.pop(key), type(item.default))
    attack = values.pop("attack", None)
    attack_sites = values.pop("attack-sites", None)
    attack_scale = values.pop("attack-scale", 10.0)
    if attack is not None:
        if attack_sites is None:
            raise CohortInputError(
                "attack is set but attack-sites is not; give site numbers ([0, 3]) or a fraction (0.2)"
            )
        plan_values["attack"] = AttackSpec.from_settings(
            attack, attack_sites, attack_scale, int(plan_values.get("num_sites", 5))
        )
    elif attack_sites is not None:
        raise CohortInputError('attack-sites is set but attack is not; name the attack (e.g. attack = "boost")')
    ray_address = values.pop("ray-address", "")
    if not isinstance(ray_address, str):
        raise CohortInputError(f"ray-address is {ray_address!r}; give it as a string, e.g. ray-address='10.0.0.5:6379'")
    plan_values["ray_address"] = ray_address
    return SimulationPlan(run=RunConfig.from_flower(values), **plan_values)


def _plan_number(key: str, value: Any, kind: type) -> float:
    """A number of the plan, of its field's kind (an int may stand for a float); its range
    is checked with the plan's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise CohortInputError(f"{key} is {value!r}; it must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def saved_plan(run_dir: Path, run: RunConfig) -> SimulationPlan:
    """The plan a run directory was started with, for --resume."""
    file = run_dir / PLAN_FILE
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CohortInputError(f"{run_dir} was not started by `cohort simulate` ({PLAN_FILE} is missing)") from None
    except json.JSONDecodeError as error:
        raise CohortInputError(f"{file} is corrupt ({error}); start a new run") from None
    attack = values.pop("attack", None)
    return SimulationPlan(
        run=run,
        attack=AttackSpec.from_json(attack) if attack else None,
        **{k.replace("-", "_"): v for k, v in values.items()},
    )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` pairs; the value is read as TOML (numbers, true/false), else a string."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CohortInputError(f"--set '{item}' is not key=value; write e.g. --set rounds=5")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        parsed[key.strip()] = value
    return parsed


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        available = ", ".join(sorted(p.name for p in SIMULATIONS_DIR.glob("*.toml")))
        raise CohortInputError(f"simulation config {path} does not exist; ready-made ones: {available}") from None
    except tomllib.TOMLDecodeError as error:
        raise CohortInputError(f"{path} is not valid TOML ({error})") from None
