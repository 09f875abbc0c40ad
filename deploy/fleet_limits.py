"""What the front door lets one client cost the SuperLink: the largest body each Fleet
route takes, and how many connections and requests one address may have.

Flower 1.42's SuperLink reads and parses a request's whole body before it checks the
SuperNode's signature, so every byte the front door lets through is a byte that anyone on
the network can make the SuperLink hold. The bounds are what a legitimate SuperNode sends
(flwr/supernode/fleet_http_connection.py and start_client_internal.py):

- `push-object` carries one object of a reply. Flower cuts every array into chunks of at
  most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), each its own object, so a model update of
  any size crosses as objects of at most one chunk, or of the whole model when it is
  smaller; the other objects (the records, an array's index of chunks) are small.
- `push-messages` carries the reply's metadata (or its error) and its object tree: one
  entry per object, so it grows with the model's tensors and chunks.
- Every other route carries ids, a public key or an interval: a few hundred bytes.

A SuperNode runs at most two object transfers at once (FLWR_PRIVATE_MAX_CONCURRENT_OBJ_
PUSHES and _PULLS) beside its heartbeat, and polls every 3 s when idle. Flower's SuperNode
retries a 503 with backoff and gives up on other errors, so a throttled request is
answered 503: a site that ever reached a limit would be slowed down, never failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.proto.message_pb2 import ObjectTree

from common.errors import CohortInputError

MIB = 1 << 20
KIB = 1 << 10
# The largest model update the front door admits unless told otherwise. Every registered
# model is far smaller (the CNN on 224x224 RGB images with 100 classes is 40 MB, the
# transformer 1.1 MB; tests/test_fleet_limits.py checks), and past one chunk a larger
# model only lengthens push-messages' object tree, not push-object's body.
DEFAULT_MAX_MODEL_MB = 1024.0
# Beyond the model's bytes: an object's header and PushObjectRequest's framing (153 bytes
# on a full chunk), or a non-array object of a reply (records, an array's index of its
# chunks; the largest measured in the deployment test: 1,812 bytes with its framing).
OBJECT_ALLOWANCE = 64 * KIB
# A reply's metadata and its error's reason, if any (Cohort's are one line); the whole of
# push-messages measured 1,935 bytes in the deployment test.
MESSAGE_ALLOWANCE = 64 * KIB
# Tensors a model may have; the registered models have at most 32 (the transformer).
MAX_TENSORS = 1024
# Objects of a reply besides its arrays and chunks: the message, its record dict and records.
RECORD_OBJECTS = 16
# Every route that carries no model: the largest measured is 227 bytes (activate-node).
SMALL_BODY = 16 * KIB
OBJECT_ROUTE = "/v1/fleet/push-object"
MESSAGES_ROUTE = "/v1/fleet/push-messages"

# Per SuperNode: two object transfers, the heartbeat and one spare.
CONNECTIONS_PER_SITE = 4
OBJECT_PUSHES_PER_SITE = 2
# Requests per second a site may keep up (two transfers of 5 MiB objects at 2 Gb/s), and
# at once: the deployment test's three sites made at most 36 in any second and 88 in any
# 10 s; a round costs a site about two requests per object of the model, one to pull it
# and one to push its update (the transformer has 53 on 224x224 images).
REQUESTS_PER_SECOND_PER_SITE = 50
BURST_PER_SITE = 500
# One site per address, as hospitals each have their own; SuperNodes that share an address
# (behind one NAT, or several on one machine) need --sites-per-address.
DEFAULT_SITES_PER_ADDRESS = 1


def tree_entry_bytes() -> int:
    """What one object adds to a serialized ObjectTree: its 64-hex-digit id and framing,
    measured on Flower's own protobuf (68 bytes in Flower 1.42)."""
    child = ObjectTree(object_id="0" * 64)
    return (
        ObjectTree(object_id="0" * 64, children=[child, child]).ByteSize()
        - ObjectTree(object_id="0" * 64, children=[child]).ByteSize()
    )


@dataclass(frozen=True)
class FleetLimits:
    """max_model_mb: the largest model update (MB) a run of this federation exchanges;
    sites_per_address: how many SuperNodes may reach the front door from one address
    (behind one NAT, or on one machine)."""

    max_model_mb: float = DEFAULT_MAX_MODEL_MB
    sites_per_address: int = DEFAULT_SITES_PER_ADDRESS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_model_mb) and 0 < self.max_model_mb <= 1024 * 1024):
            raise CohortInputError(
                f"--max-model-mb {self.max_model_mb} is not a model "
                "size; give megabytes, more than 0 and at most 1048576"
            )
        if not 1 <= self.sites_per_address <= 10_000:
            raise CohortInputError(f"--sites-per-address {self.sites_per_address} must be from 1 to 10000")

    @property
    def model_bytes(self) -> int:
        return math.ceil(self.max_model_mb * MIB)

    def body_limit(self, route: str) -> int:
        """The largest body (bytes) the front door forwards on a Fleet route."""
        if route == OBJECT_ROUTE:
            return min(self.model_bytes, FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) + OBJECT_ALLOWANCE
        if route == MESSAGES_ROUTE:
            chunks = math.ceil(self.model_bytes / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
            objects = chunks + 2 * MAX_TENSORS + RECORD_OBJECTS  # each tensor: an array and at least one chunk
            return MESSAGE_ALLOWANCE + objects * tree_entry_bytes()
        return SMALL_BODY

    @property
    def connections_per_address(self) -> int:
        return CONNECTIONS_PER_SITE * self.sites_per_address

    @property
    def object_pushes_per_address(self) -> int:
        return OBJECT_PUSHES_PER_SITE * self.sites_per_address

    @property
    def requests_per_second_per_address(self) -> int:
        return REQUESTS_PER_SECOND_PER_SITE * self.sites_per_address

    @property
    def burst_per_address(self) -> int:
        return BURST_PER_SITE * self.sites_per_address
