"""Hashing networks and hashing losses."""
from models.hash_network import ARCHS, HashModel, binarize, build_model
from models.losses import LOSSES, build_loss

__all__ = ["ARCHS", "HashModel", "binarize", "build_model", "LOSSES", "build_loss"]
