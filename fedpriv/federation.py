"""All Flower and Ray wiring in one place: a change of Flower's public API touches only this
module and fedpriv.flower_app (the `flwr run` entry point, which reads a run's config); a
change of what fedpriv uses of their internals touches fedpriv.internals.

client.py and server.py work with plain Python (state dicts, dicts of numbers); this module
turns them into a Flower ClientApp and ServerApp and runs them on Flower's simulation engine
with the Ray backend.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.simulation import run_simulation

from fedpriv.errors import FedprivError
from fedpriv.internals import (
    keep_flower_actors,
    kept_flower_actors_key,
    local_ray_cpus,
    release_flower_actors,
    swap_flower_message_queue,
)
from fedpriv.protocol import GAN_ROUND, PARTITION_ID, SYNTHESIZE
from fedpriv.settings import BackendSettings
from fedpriv.strategies.hospital_ordered import HospitalOrdered

log = logging.getLogger(__name__)

#: Seconds to wait for every hospital's node to connect, and then to answer a query (workers
#: start up on the first one).
DISCOVERY_TIMEOUT = 600.0

StateDict = dict[str, torch.Tensor]


class Hospitals(Protocol):
    """What a node's ClientApp runs for its hospital (fedpriv.client.HospitalTrainer): plain
    Python in and out, no Flower types."""

    def __call__(self, hospital: int, weights: StateDict, config: dict, shared: StateDict | None) -> tuple[StateDict, dict]:
        """Train on the global weights (round config, shared synthetic arrays or None) → (new weights, metrics)."""

    def describe(self, hospital: int) -> dict:
        """Facts the hospital shares about itself (counts and its privacy history, never records)."""

    def synthesize(self, hospital: int) -> tuple[StateDict, dict]:
        """Synthetic images, labels and generator as arrays, and metrics incl. its privacy history."""

    def train_gan_round(self, hospital: int, gan_round: int, weights: StateDict) -> tuple[StateDict, dict]:
        """One federated GAN round from the global networks → (both networks, metrics incl. its privacy history)."""


def build_client_app(hospitals_of: Callable[[Context], Hospitals]) -> ClientApp:
    """A ClientApp that runs, for the hospital of this node (node config `partition-id`),
    what `hospitals_of(context)` gives: training, the train.synthesize action, and the
    query that describes the hospital."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        hospital = int(context.node_config[PARTITION_ID])
        shared = msg.content["synthetic"].to_torch_state_dict() if "synthetic" in msg.content else None
        weights, metrics = hospitals_of(context)(hospital, msg.content["arrays"].to_torch_state_dict(), dict(msg.content["config"]), shared)
        content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.train(SYNTHESIZE)
    def _synthesize(msg: Message, context: Context) -> Message:
        hospital = int(context.node_config[PARTITION_ID])
        arrays, metrics = hospitals_of(context).synthesize(hospital)
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"hospital": hospital, **metrics})})
        return Message(content, reply_to=msg)

    @app.train(GAN_ROUND)
    def _gan_round(msg: Message, context: Context) -> Message:
        hospital = int(context.node_config[PARTITION_ID])
        gan_round = int(msg.content["config"]["gan-round"])
        arrays, metrics = hospitals_of(context).train_gan_round(hospital, gan_round, msg.content["arrays"].to_torch_state_dict())
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"hospital": hospital, **metrics})})
        return Message(content, reply_to=msg)

    @app.query()
    def _describe(msg: Message, context: Context) -> Message:
        hospital = int(context.node_config[PARTITION_ID])
        facts = {"hospital": hospital, **hospitals_of(context).describe(hospital)}
        return Message(RecordDict({"metrics": MetricRecord(facts)}), reply_to=msg)

    return app


@dataclass
class RoundOutcome:
    """What one training round produced: per-hospital metrics, failures, new global weights."""

    trained: dict[int, dict] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    exhausted: dict[int, dict] = field(default_factory=dict)  # declined: privacy budget spent
    weights: StateDict | None = None


class Federation:
    """The server's handle on the simulated hospitals: discovery and training rounds."""

    def __init__(
        self, grid: Grid, strategy: Strategy, num_hospitals: int, timeout: float, all_or_nothing: bool, seed: int
    ) -> None:
        self.grid, self.timeout = grid, timeout
        self.num_hospitals = num_hospitals
        # Client-level DP noise (privacy=central) is scaled for every sampled hospital: a partial round is not released.
        self.all_or_nothing = all_or_nothing
        self.hospital_of_node: dict[int, int] = {}
        # sampling that depends on the seed alone, aggregation in hospital order
        self.strategy = HospitalOrdered(strategy, seed, self.hospital_of_node)
        self.shared: ArrayRecord | None = None  # sent with every training message (synthetic=augment)

    def describe_hospitals(self, hospitals: Iterable[int] | None = None) -> dict[int, dict]:
        """Ask nodes which hospital they are and what they hold (counts, never records):
        every node (discovery, once per run), or only the given, already known `hospitals`."""
        if hospitals is not None and self.hospital_of_node:
            wanted = set(hospitals)
            nodes = sorted((n for n, h in self.hospital_of_node.items() if h in wanted), key=self.hospital_of_node.get)
            if not nodes:
                return {}
        else:
            nodes = self.connected_nodes()
            if self.hospital_of_node:  # known nodes: ask them in hospital order
                nodes = sorted(nodes, key=lambda n: self.hospital_of_node.get(n, n))
        messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        facts = {}
        # Not the round timeout: the first query also waits for every worker to start up.
        for reply in self.grid.send_and_receive(messages, timeout=max(self.timeout, DISCOVERY_TIMEOUT)):
            if reply.has_error():
                raise FedprivError(f"a hospital could not start: {short_reason(reply.error.reason)}")
            metrics = dict(reply.content["metrics"])
            hospital = int(metrics.pop("hospital"))
            self.hospital_of_node[reply.metadata.src_node_id] = hospital
            facts[hospital] = metrics
        if len(facts) < len(nodes):
            raise FedprivError(
                f"only {len(facts)} of {len(nodes)} hospitals answered within {max(self.timeout, DISCOVERY_TIMEOUT):g} s; "
                "a hospital is hung or its worker died"
            )
        return dict(sorted(facts.items()))

    def connected_nodes(self) -> list[int]:
        """Every connected node, once there are at least num_hospitals (a simulation's nodes
        register as it starts; a deployment's SuperNodes connect when their hospitals start
        them). Fewer after DISCOVERY_TIMEOUT seconds stops the run."""
        deadline = time.monotonic() + DISCOVERY_TIMEOUT
        if len(nodes := list(self.grid.get_node_ids())) < self.num_hospitals:
            log.info("waiting for the nodes of %d hospitals (%d connected)", self.num_hospitals, len(nodes))
        while len(nodes := list(self.grid.get_node_ids())) < self.num_hospitals:
            if time.monotonic() > deadline:
                raise FedprivError(
                    f"only {len(nodes)} of num_clients={self.num_hospitals} hospitals connected within "
                    f"{DISCOVERY_TIMEOUT:g} s; start one node per hospital (flwr run: --federation-config "
                    f"num-supernodes={self.num_hospitals})"
                )
            time.sleep(1.0)
        return nodes

    def share(self, arrays: StateDict) -> None:
        """Send these arrays (the pooled synthetic images) with every training message."""
        self.shared = ArrayRecord(arrays)

    def synthesize(self) -> tuple[dict[int, tuple[StateDict, dict]], dict[int, str]]:
        """Every hospital trains its GAN and replies with its synthetic images and generator;
        returns (hospital → (arrays, metrics)) and (hospital → failure reason)."""
        return self._ask_every_hospital(SYNTHESIZE, {})

    def train_gan_round(self, gan_round: int, weights: StateDict) -> tuple[dict[int, tuple[StateDict, dict]], dict[int, str]]:
        """Every hospital runs one round of the federated GAN from these global networks;
        returns (hospital → (both networks, metrics)) and (hospital → failure reason)."""
        return self._ask_every_hospital(GAN_ROUND, {"arrays": ArrayRecord(weights), "config": ConfigRecord({"gan-round": gan_round})})

    def _ask_every_hospital(self, action: str, records: dict) -> tuple[dict[int, tuple[StateDict, dict]], dict[int, str]]:
        """Send every hospital the same records (one message each) for this ClientApp action."""
        nodes = sorted(self.hospital_of_node, key=self.hospital_of_node.get)
        messages = [Message(RecordDict(dict(records)), message_type=f"{MessageType.TRAIN}.{action}", dst_node_id=n) for n in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        released, failed = {}, {}
        for reply in replies:
            hospital = self.hospital_of_node[reply.metadata.src_node_id]
            if reply.has_error():
                failed[hospital] = short_reason(reply.error.reason)
            else:
                released[hospital] = (reply.content["arrays"].to_torch_state_dict(), dict(reply.content["metrics"]))
        for node in nodes:
            if self.hospital_of_node[node] not in released and self.hospital_of_node[node] not in failed:
                failed[self.hospital_of_node[node]] = f"no reply within {self.timeout:g} s"
        return dict(sorted(released.items())), failed

    def train_round(self, server_round: int, weights: StateDict, config: dict) -> RoundOutcome:
        """Send the global weights to the hospitals the strategy samples, collect replies, aggregate."""
        messages = self.strategy.configure_train(server_round, ArrayRecord(weights), ConfigRecord(config), self.grid)
        if self.shared is not None:
            for message in messages:
                message.content["synthetic"] = self.shared
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        outcome = RoundOutcome()
        answered = {reply.metadata.src_node_id for reply in replies}
        for message in messages:  # Flower drops what did not arrive in time: say so
            if message.metadata.dst_node_id not in answered:
                node = message.metadata.dst_node_id
                outcome.failed[self.hospital_of_node.get(node, node)] = f"no reply within {self.timeout:g} s"
        good = []
        for reply in replies:
            hospital = self.hospital_of_node.get(reply.metadata.src_node_id, reply.metadata.src_node_id)
            if reply.has_error():
                outcome.failed[hospital] = short_reason(reply.error.reason)
            elif reply.content["metrics"].get("budget_exhausted"):
                outcome.exhausted[hospital] = dict(reply.content["metrics"])
            else:
                outcome.trained[hospital] = dict(reply.content["metrics"])
                good.append(reply)
        complete = len(good) == len(replies)
        if good and (complete or not self.all_or_nothing):
            arrays, _ = self.strategy.aggregate_train(server_round, good)
            outcome.weights = arrays.to_torch_state_dict() if arrays is not None else None
        return outcome


def short_reason(reason: str) -> str:
    """The exception message of a failed ClientApp, without Ray's wrapping and tracebacks."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    marker = "occurred. Message: "
    if marker in plain:
        plain = plain.rsplit(marker, 1)[1]
    lines = [line.strip() for line in plain.strip().strip("'>").splitlines() if line.strip()]
    return lines[-1].rstrip("'>") if lines else reason


def build_server_app(
    main: Callable[[Federation], None], strategy: Strategy, num_hospitals: int, timeout: float, all_or_nothing: bool, seed: int
) -> ServerApp:
    """A ServerApp that hands `main` a Federation over the simulation's grid."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(Federation(grid, strategy, num_hospitals, timeout, all_or_nothing, seed))

    return app


def check_backend(backend: BackendSettings) -> None:
    """Refuse what would leave the simulation waiting forever for hospitals that never start:
    a `ray.init` argument Ray does not take, or client resources that no node of a local Ray
    instance can host (Flower's actor pool would be empty). An attached cluster's nodes are
    known only once attached."""
    accepted = inspect.signature(ray.init).parameters
    init_args, resources = dict(backend.init_args), dict(backend.client_resources)
    # ray.init takes its private `_name` arguments (e.g. _node_ip_address) through **kwargs
    unknown = sorted(k for k in init_args if k not in accepted and not k.startswith("_"))
    if unknown:
        raise FedprivError(f"backend.init_args.{unknown[0]} is not an argument of ray.init; drop it")
    if backend.address or os.environ.get("RAY_ADDRESS"):
        return
    # what a local instance gets: ray.init's arguments, else Ray's own count (cgroup limits included)
    machine = {"num_cpus": local_ray_cpus(), "num_gpus": torch.cuda.device_count()}
    for key, detected in machine.items():
        have = init_args.get(key) if init_args.get(key) is not None else detected
        if resources.get(key, 0) > have:
            raise FedprivError(
                f"backend.client_resources.{key}={resources[key]:g} is more than the {have:g} of the local Ray "
                f"instance, so no hospital could start; lower it (or raise backend.init_args.{key})"
            )


def run_federation(
    server: ServerApp, client: ClientApp, num_clients: int, backend: BackendSettings, verbose: bool = False,
    keep_warm: bool = False,
) -> None:
    """Run on Flower's simulation engine (Ray backend); Ray is shut down afterwards (an
    attached cluster keeps running: only this driver disconnects). `verbose`: Flower's DEBUG
    lines and the Ray workers' output reach the driver's log (else Ray logs warnings only).

    `keep_warm` (the runs of a sweep): Ray and the hospitals' worker processes stay up after
    the run, and the next run with the same backend settings takes them as they are — their
    imports done, each data configuration and prior they built still in memory — instead of
    starting new ones; `fedpriv.internals.release_flower_actors()` ends them (the sweep does
    at exit). Each run's results are those it gives alone: hospitals seed everything from
    (run seed, round, hospital) and keep their privacy state in the run's own directory.

    An exception raised by the ServerApp is re-raised here.
    """
    init_args = {k: v for k, v in dict(backend.init_args).items() if v is not None}
    # A cluster given by backend.address or RAY_ADDRESS is attached to (ray.shutdown() below
    # only disconnects); otherwise "local": a new instance for this run, never whatever
    # cluster happens to run on this machine (which ray.init() would join by default).
    init_args["address"] = backend.address or os.environ.get("RAY_ADDRESS") or "local"
    backend_config = {"client_resources": dict(backend.client_resources), "init_args": init_args}
    key = json.dumps([backend_config, verbose], sort_keys=True, default=str)
    kept = kept_flower_actors_key()
    if kept is not None and (kept != key or not keep_warm):
        release_flower_actors()  # another backend's workers, or a run that starts its own
    warm = keep_flower_actors(key) if keep_warm else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), swap_flower_message_queue(), warm:  # asks only nodes with a message
            # Ray's tip that it will stop hiding GPUs from workers that asked for none: fedpriv
            # picks each worker's device from backend.client_resources itself (fedpriv.devices).
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(
                server_app=server, client_app=client, num_supernodes=num_clients, backend_config=backend_config,
                verbose_logging=verbose,
            )
    except BaseException:
        release_flower_actors()  # workers a failed run leaves are not handed to the next
        raise
    finally:
        if not keep_warm and ray.is_initialized():
            ray.shutdown()

