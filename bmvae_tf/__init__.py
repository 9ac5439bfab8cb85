"""bmvae_tf: pure model code (distributions, networks, aggregation of experts, objectives, models).

Only two modules here touch files: `schema` (the data contract, with `read_manifest` /
`write_manifest`) and `atomic` (publishing a file whole). Nothing else reads files or flags;
`pipeline/` (installed as `bmvae_tf.pipeline`) and `trainers/` (`bmvae_tf.trainers`) are the edges.

The Python API (`bmvae_tf.api`, imported on first use, so `import bmvae_tf` stays free of
TensorFlow) is the library's edge, as the CLI is the command line's: it reaches files only
through `schema` and `trainers/`. It exports `build_model`, `load_dataset`, `load_run`,
`evaluate`, `metric_names`, `modality_specs`; and `CustomNetworks` (`bmvae_tf.custom_networks`)
for your own layers.
"""

_API = {"build_model": "bmvae_tf.api", "load_dataset": "bmvae_tf.api", "load_run": "bmvae_tf.api",
        "evaluate": "bmvae_tf.api", "metric_names": "bmvae_tf.api", "modality_specs": "bmvae_tf.api",
        "Run": "bmvae_tf.api", "CustomNetworks": "bmvae_tf.custom_networks",
        "UserError": "bmvae_tf.errors"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bmvae_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
