"""Hamming ranking, MAP@R / t-MAP, and encoding a data set into hash codes."""
from retrieval.codes import anchor_code, encode, saved_codes
from retrieval.metrics import (CONVENTIONS, hamming_distance, hamming_rank, mean_average_precision, non_target_queries,
                               targeted_map)

__all__ = ["anchor_code", "encode", "CONVENTIONS", "hamming_distance", "hamming_rank", "mean_average_precision",
           "non_target_queries", "saved_codes", "targeted_map"]
