"""flowrl: online RL for flow-matching text-to-image models and causal LMs."""
__version__ = "0.1.0"
