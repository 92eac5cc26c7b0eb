"""Label fidelity of a synthetic pool, scored before anyone uses it: do its images carry the
class they are labelled with?

Both scores live in the feature space of the run's starting model (its prior or
initialization: nothing private shaped it), with a logistic-regression probe:
- `val_auroc`: trained on the synthetic images, scored on the real validation split — near
  0.5 the labels carry nothing, well below it they are swapped;
- `separability`: cross-validated AUROC between the pool's own two classes — whether the
  generator draws two distinguishable kinds of image at all, whatever their names.
Scoring is post-processing of what the hospitals released plus the server's validation
split, which the server already evaluates every round: it costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from fedpriv.data.records import ImageRecords
from fedpriv.metrics import auroc
from fedpriv.synthetic.pool import SyntheticPool
from fedpriv.synthetic.quality import features

#: Below this validation AUROC a pool's labels are taken as swapped; below CHANCE_BELOW, as at chance.
SWAPPED_BELOW = 0.45
CHANCE_BELOW = 0.55


@dataclass(frozen=True)
class Fidelity:
    val_auroc: float
    separability: float
    images: int

    @property
    def verdict(self) -> str:
        """ok | chance | swapped | one class (the pool holds a single class: no AUROC)."""
        if math.isnan(self.val_auroc):
            return "one class"
        if self.val_auroc < SWAPPED_BELOW:
            return "swapped"
        return "chance" if self.val_auroc < CHANCE_BELOW else "ok"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def _probe() -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def score_features(synthetic: np.ndarray, labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray) -> Fidelity:
    """Fidelity of labelled synthetic features against real validation features."""
    if len(np.unique(labels)) < 2:
        return Fidelity(val_auroc=float("nan"), separability=float("nan"), images=len(labels))
    val_scores = _probe().fit(synthetic, labels).decision_function(val)
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(labels).min())), shuffle=True, random_state=0)
    if folds.n_splits >= 2:
        held_out = cross_val_predict(_probe(), synthetic, labels, cv=folds, method="decision_function")
        separability = auroc(labels, held_out)
    else:
        separability = float("nan")
    return Fidelity(val_auroc=auroc(val_labels, val_scores), separability=separability, images=len(labels))


def pool_fidelity(pool: SyntheticPool, val: ImageRecords, starting_model: nn.Module, batch_size: int) -> dict[str, Fidelity]:
    """Per hospital (`"<k>"`) and for the whole pool (`"pooled"`)."""
    synthetic = features(starting_model, pool.records(), batch_size)
    real = features(starting_model, val, batch_size)
    scores = {
        str(hospital): score_features(synthetic[pool.hospitals == hospital], pool.labels[pool.hospitals == hospital], real, val.labels)
        for hospital in np.unique(pool.hospitals)
    }
    scores["pooled"] = score_features(synthetic, pool.labels, real, val.labels)
    return scores


def trusted_hospitals(scores: dict[str, Fidelity], min_fidelity: float | None) -> list[int]:
    """The hospitals whose pool reaches `min_fidelity` validation AUROC (all when None)."""
    hospitals = [int(h) for h in scores if h != "pooled"]
    if min_fidelity is None:
        return hospitals
    return [h for h in hospitals if scores[str(h)].val_auroc >= min_fidelity]  # NaN (one class) fails
