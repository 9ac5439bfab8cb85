"""bmvae_tf: pure model code (distributions, networks, aggregation of experts, objectives, models).

Nothing in this package reads files or flags; `pipeline/` and `trainers/` are the edges.
"""
