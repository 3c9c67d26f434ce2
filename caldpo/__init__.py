"""caldpo: Cal-DPO training with fused log-prob kernels."""
__version__ = "0.1.0"
