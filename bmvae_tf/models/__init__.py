"""The model zoo: one class per file, selected by name (SPEC section 1)."""

from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.models.bmvae_m import BMVAEM

# name -> (class, fixed keyword arguments). The trainer adds the configured hyper-parameters.
MODELS = {
    "bmvae_m": (BMVAEM, {}),
    "bmvae_m_uniform": (BMVAEM, {"learn_weights": False}),
}

__all__ = ["BMVAEM", "LossTerms", "MODELS", "MultimodalVAE"]
