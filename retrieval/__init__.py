"""Hamming ranking, MAP@R / t-MAP, precision curves, and encoding a data set into hash codes."""
from retrieval.codes import anchor_code, encode, saved_codes, stage_database_codes
from retrieval.metrics import (CONVENTIONS, TIE_BREAK, hamming_distance, hamming_rank, mean_average_precision,
                               non_target_queries, precision_at_k, precision_recall_by_radius, target_labels,
                               targeted_map)

__all__ = ["anchor_code", "encode", "CONVENTIONS", "TIE_BREAK", "hamming_distance", "hamming_rank",
           "mean_average_precision", "non_target_queries", "precision_at_k", "precision_recall_by_radius",
           "saved_codes", "stage_database_codes", "target_labels", "targeted_map"]
