"""The model zoo: one class per file, selected by name (SPEC section 1).

Each class declares what it reads: its hyper-parameter dataclasses (`hyper_parameter_sections()`,
e.g. BMVAEMHyperParameters as section `bmvae_m`) and whether it takes K (`IMPORTANCE_SAMPLED`).
"""

from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.models.bmvae_m import BMVAEM, BMVAEMHyperParameters
from bmvae_tf.models.bmvae_p import BMVAEP, BMVAEPHyperParameters
from bmvae_tf.models.hyper_parameters import HyperParameterError
from bmvae_tf.models.mmjsd import MMJSD
from bmvae_tf.models.mmjsd_ms import MMJSDMS
from bmvae_tf.models.mmvae import MMVAE, MMVAEHyperParameters
from bmvae_tf.models.mmvae_ms import MMVAEMS
from bmvae_tf.models.modality_specific import ModalitySpecificHyperParameters
from bmvae_tf.models.mvae import MVAE
from bmvae_tf.models.mvae_ms import MVAEMS

# name -> (class, fixed keyword arguments): the variants of one class differ in these only. The
# trainer adds the shared arguments, K and the hyper-parameter sections the class reads.
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

__all__ = ["BMVAEM", "BMVAEMHyperParameters", "BMVAEP", "BMVAEPHyperParameters",
           "HyperParameterError", "LossTerms", "MMJSD", "MMJSDMS", "MMVAE", "MMVAEHyperParameters",
           "MMVAEMS", "MODELS", "MVAE", "MVAEMS", "ModalitySpecificHyperParameters", "MultimodalVAE"]
