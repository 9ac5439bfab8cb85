"""A stand-in for torchvision, for the peer benchmark only (bench/peers/README.md).

multivae imports torchvision at module level (datasets, transforms, make_grid, save_image, the
inception network of its FID metric); the benchmark uses none of them. Where no torchvision that
matches the installed torch will import, multivae_worker.py puts this folder first on sys.path:
every name of torchvision and of the submodules multivae imports from resolves to an inert
placeholder (calling one gives another). Nothing the benchmark runs touches them.
"""

import sys
import types

__version__ = "stub"
STUB = True


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        # multivae calls some at import time (default arguments such as ToTensor()): a call gives
        # another placeholder; the benchmark reaches none of them.
        return _Missing(f"{self._name}()")

    def __repr__(self):
        return f"<torchvision stub {self._name}>"

    def __getattr__(self, attr):
        return _placeholder(f"{self._name}.{attr}", attr)

    def __mro_entries__(self, bases):  # `class X(torchvision.datasets.MNIST)` still defines X
        return (object,)


def _placeholder(full_name, attr):
    if attr.startswith("__"):  # dunders stay missing: inspect and pickle probe them
        raise AttributeError(attr)
    return _Missing(full_name)


def _module(name):
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr, _n=name: _placeholder(f"{_n}.{attr}", attr)
    module.__path__ = []  # a package, so that deeper submodules import
    sys.modules[name] = module
    return module


for _sub in ("transforms", "datasets", "datasets.utils", "utils", "models", "io", "ops"):
    _module(f"{__name__}.{_sub}")
transforms, datasets, utils, models = (sys.modules[f"{__name__}.{s}"]
                                       for s in ("transforms", "datasets", "utils", "models"))
datasets.utils = sys.modules[f"{__name__}.datasets.utils"]


def __getattr__(attr):
    return _placeholder(f"torchvision.{attr}", attr)
