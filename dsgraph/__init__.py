"""dsgraph: declare, check and run several models together under DeepSpeed ZeRO."""

__version__ = "0.1.0"
