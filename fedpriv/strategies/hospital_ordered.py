"""fedpriv's wrapper around any Flower strategy (in the style of Flower's DP wrappers): the
hospitals it samples depend on the run's seed alone, and replies are aggregated in hospital
order. Flower's strategies sample with Python's global `random` over the grid's node ids, and
float sums do not commute: without this wrapper the same seed could sample other hospitals
(node ids are random) and give other weights (replies arrive in any order).

Under an averaging strategy (FedAvg, FedProx), an array that every hospital returns exactly as
it was sent — a frozen backbone — stays exactly as it was: the float average of equal arrays
can differ from them in the last bit, which would make every round's backbone a new one
(fedpriv.head_inputs recomputes what a changed backbone makes of the records)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedpriv.internals import seed_flower_node_sampling
from fedpriv.protocol import SERVER, round_seed


#: Strategies whose aggregate of replies that all equal the sent arrays is exactly those
#: arrays (a weighted average); not server optimizers (momentum moves them) nor DP wrappers (noise).
AVERAGING = (FedAvg, FedProx)


class HospitalOrdered(Strategy):
    """Wraps `strategy`; `hospital_of_node` (filled at discovery) maps node ids to hospitals."""

    def __init__(self, strategy: Strategy, seed: int, hospital_of_node: Mapping[int, int]) -> None:
        self.strategy, self.seed, self.hospital_of_node = strategy, seed, hospital_of_node
        self._sent: ArrayRecord | None = None  # this round's arrays, under an averaging strategy

    def _hospital(self, node: int) -> int:
        return self.hospital_of_node.get(node, node)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        seed_flower_node_sampling(round_seed(self.seed, server_round, SERVER))
        self._sent = arrays if type(self.strategy) in AVERAGING else None
        return self.strategy.configure_train(server_round, arrays, config, _HospitalOrderedGrid(grid, self._hospital))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda reply: self._hospital(reply.metadata.src_node_id))
        arrays, metrics = self.strategy.aggregate_train(server_round, ordered)
        if arrays is not None and self._sent is not None:
            returned = [next(iter(r.content.array_records.values())) for r in ordered if r.has_content() and r.content.array_records]
            for key, sent in self._sent.items():
                if key in arrays and returned and all(key in r and r[key].data == sent.data for r in returned):
                    arrays[key] = sent  # unchanged by every hospital: unchanged, to the bit
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class _HospitalOrderedGrid:
    """The grid, listing node ids in hospital order (what seeded sampling draws from)."""

    def __init__(self, grid: Grid, hospital) -> None:
        self._grid, self._hospital = grid, hospital

    def get_node_ids(self):
        return sorted(self._grid.get_node_ids(), key=self._hospital)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
