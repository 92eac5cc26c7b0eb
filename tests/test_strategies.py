"""fedpriv's hospital-ordered wrapper around Flower's strategies, on real Flower messages."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedpriv.protocol import NUM_EXAMPLES
from fedpriv.strategies.hospital_ordered import HospitalOrdered


class Nodes:
    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


#: A frozen part every hospital returns as sent, and a head each moves; weights whose float
#: average of three equal arrays is not those arrays to the bit.
SENT = {"backbone": torch.full((64,), 0.1) + torch.linspace(0, 1e-3, 64), "head": torch.zeros(4)}
EXAMPLES = {11: 367, 12: 368, 13: 369}


def _aggregate(strategy) -> dict[str, torch.Tensor]:
    replies = []
    for message in strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), Nodes()):
        node = message.metadata.dst_node_id
        returned = {"backbone": SENT["backbone"].clone(), "head": SENT["head"] + node}
        metrics = MetricRecord({NUM_EXAMPLES: EXAMPLES[node]})
        replies.append(Message(RecordDict({"arrays": ArrayRecord(returned), "metrics": metrics}), reply_to=message))
    replies.sort(key=lambda reply: reply.metadata.src_node_id)  # hospital order, with or without the wrapper
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


def _fedavg(cls=FedAvg, **kwargs):
    return cls(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3, weighted_by_key=NUM_EXAMPLES, **kwargs)


def test_an_array_every_hospital_returns_unchanged_stays_unchanged_to_the_bit(flower_task):
    plain = _aggregate(_fedavg())
    assert not torch.equal(plain["backbone"], SENT["backbone"])  # the float average moved it by rounding
    wrapped = _aggregate(HospitalOrdered(_fedavg(), 0, {11: 0, 12: 1, 13: 2}))
    assert torch.equal(wrapped["backbone"], SENT["backbone"])
    assert torch.equal(wrapped["head"], plain["head"])  # what the hospitals changed is their average
    expected = sum(EXAMPLES[n] * (SENT["head"] + n) for n in EXAMPLES) / sum(EXAMPLES.values())
    assert torch.allclose(wrapped["head"], expected)


def test_a_server_optimizer_aggregates_as_it_would_without_the_wrapper(flower_task):
    """Server momentum moves even an array the hospitals left unchanged: only averages keep it."""
    momentum = dict(server_learning_rate=1.0, server_momentum=0.9)
    plain = _aggregate(_fedavg(FedAvgM, **momentum))
    wrapped = _aggregate(HospitalOrdered(_fedavg(FedAvgM, **momentum), 0, {11: 0, 12: 1, 13: 2}))
    assert all(torch.equal(plain[k], wrapped[k]) for k in SENT)
