"""The privacy ledger: every DP mechanism applied to each hospital's records, and the ε
that follows. It is the only source of the ε figures fedpriv reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedpriv.errors import FedprivError
from fedpriv.outputs import write_json
from fedpriv.privacy.accounting import History, epsilon_spent
from fedpriv.privacy.hospital_state import is_gan_round


#: `hospital` of the federation-wide client-level mechanism (DP-FedAvg at the server).
FEDERATION = -1


def mechanism_name(round: int, noise_multiplier: float) -> str:
    """dp-sgd (the classifier), dp-gan (the GAN's discriminator), or gan-without-dp (ε = ∞)."""
    if not is_gan_round(round):
        return "dp-sgd"
    return "dp-gan" if noise_multiplier > 0 else "gan-without-dp"


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism applied in one round: DP-SGD at a hospital (record level), or the
    server's noisy aggregate (client level, hospital = FEDERATION)."""

    hospital: int
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    """Cumulative record-level accounting per hospital (RDP), never reset.

    Entries are indexed by hospital and each hospital's ε is cached until its entries
    change, so a round costs what the hospitals that took part add, not the federation's size.
    """

    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    #: Steps that touched no private record (a prior, given weights): ε = 0, listed for the record.
    public: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_hospital: dict[int, list[LedgerEntry]] = {}
        for entry in self.entries:
            self._by_hospital.setdefault(entry.hospital, []).append(entry)
        self._epsilon: dict[int, float] = {}

    def sync_hospital(self, hospital: int, sessions: list[tuple[int, float, float, int]]) -> None:
        """Take a hospital's own record of its DP-SGD sessions (round, σ, q, steps).

        The ledger only ever grows: every session it already holds for this hospital must be
        in the hospital's record, else the hospital's privacy state was lost or rewritten.
        """
        reported = [LedgerEntry(hospital, r, mechanism_name(r, s), s, q, n) for r, s, q, n in sessions]
        reported.sort(key=lambda e: e.round)  # stable: the order `entries` keeps them in
        known = self._by_hospital.get(hospital, [])
        if reported == known:
            return
        missing = list((Counter(known) - Counter(reported)).elements())  # two equal sessions count twice
        if missing:
            raise FedprivError(
                f"hospital {hospital} no longer reports its DP-SGD session of round {missing[0].round} "
                "that the ledger holds; its privacy state was lost — do not trust this run"
            )
        self._by_hospital[hospital] = reported
        self._epsilon.pop(hospital, None)
        self.entries = [e for e in self.entries if e.hospital != hospital] + reported
        self.entries.sort(key=lambda e: (e.round, e.hospital))

    def record_release(self, round: int, noise_multiplier: float, sample_rate: float) -> None:
        """One client-level release: the server's clipped, noised average of hospital updates."""
        entry = LedgerEntry(FEDERATION, round, "dp-fedavg", noise_multiplier, sample_rate, 1)
        self.entries.append(entry)
        self._by_hospital.setdefault(FEDERATION, []).append(entry)
        self._epsilon.pop(FEDERATION, None)

    def entries_of(self, hospital: int) -> list[LedgerEntry]:
        """This hospital's entries (FEDERATION: the client-level releases), in round order."""
        return list(self._by_hospital.get(hospital, []))

    def history(self, hospital: int, through_round: int | None = None, mechanism: str | None = None) -> History:
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self._by_hospital.get(hospital, [])
            if (through_round is None or e.round <= through_round)
            and (mechanism is None or e.mechanism == mechanism)
        ]

    def client_level_epsilon(self, through_round: int | None = None) -> float:
        """Client-level ε of the federation (what any one hospital's participation reveals)."""
        return self.epsilon(FEDERATION, through_round)

    def epsilon(self, hospital: int, through_round: int | None = None, mechanism: str | None = None) -> float:
        """Record-level ε of `hospital` over everything recorded (up to a round; 0 if never;
        ∞ after a GAN without DP); `mechanism` alone when given (e.g. "dp-gan")."""
        if through_round is not None or mechanism is not None:
            return epsilon_spent(self.history(hospital, through_round, mechanism), self.delta)
        if hospital not in self._epsilon:
            self._epsilon[hospital] = epsilon_spent(self.history(hospital), self.delta)
        return self._epsilon[hospital]

    def epsilons(self, hospitals: list[int]) -> dict[int, float]:
        return {h: self.epsilon(h) for h in hospitals}

    def to_dict(self, hospitals: list[int], record_level: bool = True, client_level: bool = True) -> dict:
        """The ledger as JSON-ready data; an ε is null where its mechanism never ran in this run
        (`record_level`: DP-SGD at the hospitals, `client_level`: DP-FedAvg at the server),
        never 0, which would claim perfect privacy."""
        return {
            "accountant": "rdp",
            "delta": self.delta,
            "epsilon": {str(h): e if record_level else None for h, e in self.epsilons(hospitals).items()},
            "client_level_epsilon": self.client_level_epsilon() if client_level else None,
            "entries": [asdict(e) for e in self.entries],
            "public_steps": [dict(step) for step in self.public],
        }

    def save(self, path: Path, hospitals: list[int], record_level: bool = True, client_level: bool = True) -> None:
        write_json(path, self.to_dict(hospitals, record_level, client_level))

    @classmethod
    def from_dict(cls, payload: dict) -> PrivacyLedger:
        return cls(payload["delta"], [LedgerEntry(**e) for e in payload["entries"]], list(payload.get("public_steps", [])))
