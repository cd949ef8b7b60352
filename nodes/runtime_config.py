"""Moved to nodes/config.py (one config module for the node side); this name goes once no
caller imports it."""

from nodes.config import EMBEDDED_MODELS, FINGERPRINT_SAMPLES, SwarmSpec, TrainConfig

__all__ = ["EMBEDDED_MODELS", "FINGERPRINT_SAMPLES", "SwarmSpec", "TrainConfig"]
