"""A run whose hospitals train in this process: fedpriv's server and its real ClientApp talk
through Flower's messages, without the simulation engine (no Ray, no worker start-up).

For tests of what hospitals and the server do (accounting, budgets, outputs, models, data);
what only the engine does (concurrency, failures and timeouts, attaching to a cluster, the
worker processes) is tested on Flower's simulation engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.client import HospitalTrainer
from fedpriv.experiment import HOSPITAL_STATE_DIR, run_experiment
from fedpriv.federation import build_client_app
from fedpriv.settings import RunSettings

#: Node ids are not hospital numbers (as on the engine, whose node ids are random).
FIRST_NODE = 1000


class InProcessGrid(Grid):
    """Flower's Grid over `num_nodes` nodes, each running `client_app` in this process: one
    message after the other, every message and reply through Flower's wire format (as
    between a SuperLink and its SuperNodes), so nothing but bytes passes between them.

    A ClientApp's exception is raised here: runs whose hospitals fail belong on the engine.
    """

    def __init__(self, client_app, num_nodes: int) -> None:
        # this process is the ServerApp's: who sends (as Flower's runtime sets it for a ServerApp)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
        self.app = client_app
        self.contexts = {
            FIRST_NODE + p: Context(0, FIRST_NODE + p, {"partition-id": p, "num-partitions": num_nodes}, RecordDict(), {})
            for p in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(message) for message in messages]

    def _deliver(self, message: Message) -> Message:
        message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids set it
        threads = torch.get_num_threads()  # a hospital sets its own; the server keeps its count
        try:
            reply = self.app(_over_the_wire(message), self.contexts[message.metadata.dst_node_id])
        finally:
            torch.set_num_threads(threads)
        return _over_the_wire(reply)

    # What the Federation never calls (it sends through send_and_receive only).
    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def _over_the_wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


def run_in_process(settings: RunSettings, run_dir: Path, **hooks) -> dict:
    """run_experiment with the hospitals in this process; `hooks`: on_round, on_partition."""
    trainer = HospitalTrainer(settings, str(Path(run_dir) / HOSPITAL_STATE_DIR))
    grid = InProcessGrid(build_client_app(lambda context: trainer), settings.num_clients)
    return run_experiment(settings, run_dir, grid=grid, **hooks)
