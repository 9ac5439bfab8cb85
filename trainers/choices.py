"""The names the command line offers, without importing TensorFlow (`bmvae --help` must answer
at once). tests/trainers/test_cli.py checks that they equal `bmvae_tf.models.MODELS`' keys and
`trainers.config.STRATEGIES`."""

MODEL_NAMES = ("bmvae_m", "bmvae_m_uniform", "bmvae_p", "bmvae_p_uniform", "mmvae", "mmvae_tight",
               "mvae", "mmjsd", "mvae_ms", "mmvae_ms", "mmjsd_ms")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
