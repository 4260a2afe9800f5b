"""The defenses of defend.py, one module per family: fine_pruning (Liu et al., RAID 2018) and abl (anti-backdoor
learning, Li et al., NeurIPS 2021); `common` holds what they share (the attacked run they read, the scores)."""
from defenses.common import Victim, defender_images, load_victim, retrieval_scores

__all__ = ["Victim", "defender_images", "load_victim", "retrieval_scores"]
