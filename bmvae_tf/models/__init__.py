"""The model zoo: one class per file, selected by name (SPEC section 1)."""

from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.models.bmvae_m import BMVAEM
from bmvae_tf.models.bmvae_p import BMVAEP
from bmvae_tf.models.mmjsd import MMJSD
from bmvae_tf.models.mmjsd_ms import MMJSDMS
from bmvae_tf.models.mmvae import MMVAE
from bmvae_tf.models.mmvae_ms import MMVAEMS
from bmvae_tf.models.mvae import MVAE
from bmvae_tf.models.mvae_ms import MVAEMS

# name -> (class, fixed keyword arguments). The trainer adds the configured hyper-parameters.
MODELS = {
    "bmvae_m": (BMVAEM, {}),
    "bmvae_m_uniform": (BMVAEM, {"learn_weights": False}),
    "bmvae_p": (BMVAEP, {}),
    "bmvae_p_uniform": (BMVAEP, {"learn_weights": False}),
    "mmvae": (MMVAE, {}),
    "mmvae_tight": (MMVAE, {"bound": "tight"}),
    "mvae": (MVAE, {}),
    "mmjsd": (MMJSD, {}),
    "mvae_ms": (MVAEMS, {}),
    "mmvae_ms": (MMVAEMS, {}),
    "mmjsd_ms": (MMJSDMS, {}),
}

__all__ = ["BMVAEM", "BMVAEP", "LossTerms", "MMJSD", "MMJSDMS", "MMVAE", "MMVAEMS", "MODELS", "MVAE",
           "MVAEMS", "MultimodalVAE"]
