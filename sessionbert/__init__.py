"""SessionBERT: user personas and new-service recommendation from console session trajectories."""

__version__ = "0.1.0"
