"""Priors that cost no privacy: initial weights learned before any private record is touched.

`prior=phantom` trains the classifier on the procedural phantom (supervised: its masses carry
the shape cues real masses share); `prior=random_process` learns features contrastively on
images of random processes (dead leaves, 1/f textures); `prior=none` starts from a random
initialization. A prior is computed once per (settings that shape it, model, seed) and cached
on disk (fedpriv.priors.cache); the run records it in the ledger as a public step with ε = 0.
"""

from fedpriv.priors.build import PRIORS, prior_weights

__all__ = ["PRIORS", "prior_weights"]
