"""bmvae_tf: pure model code (distributions, networks, aggregation of experts, objectives, models).

Only two modules here touch files: `schema` (the data contract, with `read_manifest` /
`write_manifest`) and `atomic` (publishing a file whole). Nothing else reads files or flags;
`pipeline/` (installed as `bmvae_tf.pipeline`) and `trainers/` (`bmvae_tf.trainers`) are the edges.
"""
