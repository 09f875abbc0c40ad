"""The front door's body limits admit every reply a registered model makes, serialized by
Flower itself as a SuperNode pushes it, and no more than `--max-model-mb` allows."""

from __future__ import annotations

import uuid

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from common.models.registry import build_model
from deploy.fleet_limits import MESSAGES_ROUTE, OBJECT_ROUTE, FleetLimits

NODE = Node(node_id=2**64 - 1)
# MedMNIST+'s largest images, and more classes than any MedMNIST task.
LARGE_IMAGES = (3, 224, 224)
MANY_CLASSES = 100


def _largest_bodies(model_name: str, input_shape: tuple[int, int, int], classes: int) -> dict[str, int]:
    """The largest push-object body and the push-messages body of a training reply carrying
    the model, a ledger entry and metrics, framed as Flower's SuperNode frames them."""
    model = build_model(model_name, input_shape, classes)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "ledger": ConfigRecord({"entry": "x" * 2000}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    reply = Message(content, dst_node_id=1, message_type="train")
    objects = get_all_nested_objects(reply)
    largest_object = max(
        PushObjectRequest(
            node=NODE,
            run_id=2**64 - 1,
            object_id=object_id,
            object_content=item.deflate(),
            session_id=str(uuid.uuid4()),
        ).ByteSize()
        for object_id, item in objects.items()
    )
    messages = PushMessagesRequest(
        node=NODE,
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[get_object_tree(reply)],
        clientapp_runtime_list=[1.0],
    )
    return {OBJECT_ROUTE: largest_object, MESSAGES_ROUTE: messages.ByteSize()}


@pytest.mark.parametrize("model_name", ["cnn", "transformer"])
def test_the_default_limits_admit_a_reply_of_each_registered_model_on_large_images(
    clientapp_identity: None, model_name: str
) -> None:
    bodies = _largest_bodies(model_name, LARGE_IMAGES, MANY_CLASSES)
    assert all(size <= FleetLimits().body_limit(route) for route, size in bodies.items()), bodies


def test_a_model_within_max_model_mb_fits_a_front_door_sized_for_it(clientapp_identity: None) -> None:
    """The CNN on 28x28 MNIST is 82 KB: a front door for 0.1 MB models admits it."""
    bodies = _largest_bodies("cnn", (1, 28, 28), 10)
    assert all(size <= FleetLimits(max_model_mb=0.1).body_limit(route) for route, size in bodies.items()), bodies


def test_a_model_beyond_max_model_mb_is_refused_on_push_object(clientapp_identity: None) -> None:
    """The CNN on 224x224 RGB images with 100 classes (40 MB, pushed in 5 MiB chunks)
    against a front door for 1 MB models."""
    bodies = _largest_bodies("cnn", LARGE_IMAGES, MANY_CLASSES)
    assert bodies[OBJECT_ROUTE] > FleetLimits(max_model_mb=1).body_limit(OBJECT_ROUTE)
