"""What the server and the hospitals agree on: the keys of their messages, the ClientApp
actions beyond plain training, and the seed of each (round, hospital). Both sides import
this module; it imports nothing of fedpriv."""

from __future__ import annotations

#: Node config key naming the hospital a node is (Flower's simulation sets it per node).
PARTITION_ID = "partition-id"
#: Metric with a hospital's number of training records: FedAvg's aggregation weight.
NUM_EXAMPLES = "num-examples"
#: Metric every hospital reports as 1: the aggregation weight under client-level DP
#: (privacy=central), where a hospital's update must count the same whatever its size
#: (sensitivity C / sampled).
UNIFORM_WEIGHT = "uniform-weight"
#: The ClientApp action that trains a hospital's GAN (message type "train.synthesize").
SYNTHESIZE = "synthesize"
#: The ClientApp action that runs one round of the federated GAN (message type "train.gan_round").
GAN_ROUND = "gan_round"
#: `hospital` of what the server does for the whole federation (its sampling seed).
SERVER = -1


def round_seed(seed: int, server_round: int, hospital: int) -> int:
    """Distinct, reproducible seed for each (run seed, round, hospital; SERVER: the server's)."""
    return (seed * 1_000_003 + server_round * 1_009 + hospital) % (2**31)
