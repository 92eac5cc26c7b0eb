"""fedpriv: simulate hospitals training one cancer classifier with federated DP-SGD."""

from fedpriv.errors import FedprivError

__all__ = ["FedprivError"]
__version__ = "0.1.0"
