"""What the models' hyper-parameter dataclasses share: the error that names the field.

Each model class declares its own hyper-parameters once, in a frozen dataclass beside it
(`BMVAEMHyperParameters` in bmvae_m.py, `BMVAEPHyperParameters`, `MMVAEHyperParameters`,
`ModalitySpecificHyperParameters`): the defaults its constructor takes and the checks its
`__post_init__` makes. The class names the dataclass in `HYPER_PARAMETERS` under its section of
the trainer config (`model.bmvae_m`, ...), and the trainer config uses the same dataclass as that
section, so a default or a range is written in one place only.
"""

from __future__ import annotations

from typing import Any


class HyperParameterError(ValueError):
    """A hyper-parameter out of its range. The message starts with the field's name, so a config
    loader can put its section in front ("model.bmvae_m." + "lambda_c must be >= 0, got -1.0")."""

    def __init__(self, field: str, requirement: str, value: Any):
        super().__init__(f"{field} {requirement}, got {value!r}")
        self.field = field


def require(ok: bool, field: str, requirement: str, value: Any) -> None:
    """Raises HyperParameterError(field, requirement, value) unless `ok`."""
    if not ok:
        raise HyperParameterError(field, requirement, value)
