"""The defenses of defend.py, one module per family: fine_pruning (Liu et al., RAID 2018), abl (anti-backdoor
learning, Li et al., NeurIPS 2021) and dp (DP-SGD training with loss-based detection, Du et al., ICLR 2020);
`common` holds what they share (the attacked run they read, the scores, the per-image losses)."""
from defenses.common import Victim, defender_images, load_victim, per_image_losses, retrieval_scores

__all__ = ["Victim", "defender_images", "load_victim", "per_image_losses", "retrieval_scores"]
