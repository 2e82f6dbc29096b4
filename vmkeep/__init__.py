"""vmkeep: agentless virtual-machine backup."""

__version__ = "0.1.0"
