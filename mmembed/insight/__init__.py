"""Insight tools: look inside a run (attention maps, entropy and temperature, tokenizer statistics,
embedding maps, scaling fits). One import statement per module; `mmembed.insight.entropy` stays the module
(its `entropy(probs)` helper is imported from there)."""

from mmembed.insight.attention import AttentionMaps, attention_maps, head_weights
from mmembed.insight.entropy import (SweepRow, TokenEntropy, distinct_n, logits_entropy, model_entropy, plot_sweep,
                                     sweep_json, sweep_table, temperature_sweep, token_entropy)
from mmembed.insight.embedding_map import EmbeddingMap, map_vectors, pca_2d, project_2d
from mmembed.insight.tokenizer_stats import TokenizerStatsRow, parse_vocab_sizes, plot_tokenizer_stats
from mmembed.insight.power_law import PowerLawFit, fit_power_law
from mmembed.insight.flops import estimated_training_flops, measured_flops
from mmembed.insight.scaling import SweepReport, run_sweep
from mmembed.insight.regularisation import RegularisationReport, run_regularisation

__all__ = ["AttentionMaps", "EmbeddingMap", "PowerLawFit", "RegularisationReport", "SweepReport", "SweepRow",
           "TokenEntropy", "TokenizerStatsRow", "attention_maps", "distinct_n", "estimated_training_flops",
           "fit_power_law", "head_weights", "logits_entropy", "map_vectors", "measured_flops", "model_entropy",
           "parse_vocab_sizes", "pca_2d", "plot_sweep", "plot_tokenizer_stats", "project_2d", "run_regularisation",
           "run_sweep", "sweep_json", "sweep_table", "temperature_sweep", "token_entropy"]
