"""MultiVae's side of the peer benchmark: a long-lived worker run by the peers venv's Python.

    bench/peers/.venv/bin/python bench/peers/multivae_worker.py --threads 2

bench/peers/side_by_side.py starts it and speaks one JSON object per line over stdin/stdout:
    {"cmd": "info"}                                 -> versions, threads, torchvision (real or stub)
    {"cmd": "build", "name": N, "model": "mmvae"|"mvae", "K": k, "batch": b, "learning_rate": lr,
     "amsgrad": bool, "loss": "dreg_looser"|"iwae_looser", "learn_prior": bool,
     "likelihood_scale": s, "rescale_factors": {...}, "warmup": n, "seed": s}
                                                    -> {"parameters": ..., "first_step_seconds": ...}
    {"cmd": "time", "name": N, "steps": n}          -> {"wall": s, "cpu": s, "loss": x}
    {"cmd": "quit"}
Everything else it prints goes to stderr. A training step is what MultiVae's BaseTrainer.train_step
does per batch: model(inputs, epoch=...), optimizer.zero_grad(), loss.backward(),
optimizer.step(), loss.item(); the batch is random data of the MNIST-SVHN shapes held in memory,
as our side's (bench/common.random_batch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if importlib.util.find_spec("torchvision") is None or os.environ.get("PEERS_TORCHVISION_STUB") == "1":
    sys.path.insert(0, os.path.join(HERE, "stubs"))

import layer_tables  # noqa: E402  (bench/peers/layer_tables.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


ARGS = parse_args()
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(ARGS.threads)

try:
    import torchvision  # noqa: E402
except Exception:  # noqa: BLE001  (a torchvision that does not match torch: the stub instead)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.join(HERE, "stubs"))
    import torchvision  # noqa: E402
from multivae.models import MMVAE, MMVAEConfig, MVAE, MVAEConfig  # noqa: E402
from multivae.models.base import BaseDecoder, BaseEncoder, ModelOutput  # noqa: E402
from pythae.data.datasets import DatasetOutput  # noqa: E402
from torch import nn  # noqa: E402

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, None: None}


def torch_layer(layer):
    kind = layer[0]
    if kind == "dense":
        _, n_in, n_out, act = layer
        module = nn.Linear(n_in, n_out)
    else:
        _, c_in, c_out, k, s, p, act = layer
        cls = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d
        module = cls(c_in, c_out, k, stride=s, padding=p)
    return [module] + ([ACTIVATIONS[act]()] if act else [])


class TableEncoder(BaseEncoder):
    """An encoder of layer_tables.py's table: trunk, then loc and log_covariance heads. MultiVae
    names the raw scale `log_covariance`; MMVAE's Laplace maps it by softmax * D + 1e-6, as ours."""

    def __init__(self, table):
        super().__init__()
        self.flatten_input = table["flatten_input"]
        self.trunk = nn.Sequential(*[m for layer in table["trunk"] for m in torch_layer(layer)])
        self.loc = torch_layer(table["heads"])[0]
        self.raw_scale = torch_layer(table["heads"])[0]

    def forward(self, x):
        h = self.trunk(x.reshape(x.shape[0], -1) if self.flatten_input else x)
        loc, raw = self.loc(h), self.raw_scale(h)
        return ModelOutput(embedding=loc.reshape(x.shape[0], -1), log_covariance=raw.reshape(x.shape[0], -1))


class TableDecoder(BaseDecoder):
    """A decoder of layer_tables.py's table, ending in the sigmoid that gives the image mean (our
    likelihood applies the same sigmoid to the decoder's output)."""

    def __init__(self, table):
        super().__init__()
        layers = [m for layer in table["layers"] for m in torch_layer(layer)]
        self.is_conv = table["layers"][0][0] != "dense"
        self.net = nn.Sequential(*layers, nn.Sigmoid())
        h, w, c = table["output_shape"]
        self.output_shape = (c, h, w)

    def forward(self, z):
        h = self.net(z[:, :, None, None] if self.is_conv else z)
        return ModelOutput(reconstruction=h.reshape(z.shape[0], *self.output_shape))


def build_model(spec):
    nets = layer_tables.networks()
    encoders = {m: TableEncoder(n["encoder"]) for m, n in nets.items()}
    decoders = {m: TableDecoder(n["decoder"]) for m, n in nets.items()}
    dims = {m: tuple(n["decoder"]["output_shape"][i] for i in (2, 0, 1)) for m, n in nets.items()}
    common = dict(n_modalities=len(nets), latent_dim=layer_tables.LATENT, input_dims=dims,
                  uses_likelihood_rescaling=True, rescale_factors=spec["rescale_factors"],
                  decoders_dist={m: "laplace" for m in nets},
                  decoder_dist_params={m: {"scale": spec["likelihood_scale"]} for m in nets})
    if spec["model"] == "mmvae":
        config = MMVAEConfig(**common, K=spec["K"], prior_and_posterior_dist="laplace_with_softmax",
                             learn_prior=spec["learn_prior"], loss=spec["loss"])
        return MMVAE(config, encoders, decoders)
    if spec["model"] == "mvae":
        # warmup 0: the KL weight is 1 from the first step, as ours; M = 2 leaves k = 0 random subsets.
        config = MVAEConfig(**common, use_subsampling=True, k=0, warmup=0)
        return MVAE(config, encoders, decoders)
    raise ValueError(f"unknown model {spec['model']!r}")


def random_inputs(batch, seed):
    """Random images in [0, 1] of the MNIST-SVHN shapes, channels first."""
    rng = np.random.default_rng(seed)
    data = {}
    for m, n in layer_tables.networks().items():
        h, w, c = n["decoder"]["output_shape"]
        data[m] = torch.from_numpy(rng.uniform(size=(batch, c, h, w)).astype(np.float32))
    return DatasetOutput(data=data)


class Contestant:
    def __init__(self, spec):
        torch.manual_seed(spec.get("seed", 0))
        self.model = build_model(spec)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec["learning_rate"],
                                          amsgrad=spec["amsgrad"])
        self.inputs = random_inputs(spec["batch"], spec.get("seed", 0))

    def step(self):
        output = self.model(self.inputs, epoch=1, batch_ratio=0)
        self.optimizer.zero_grad()
        output.loss.backward()
        self.optimizer.step()
        return output.loss.item()

    def steps(self, n):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = None
        for _ in range(n):
            loss = self.step()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "loss": loss}

    def parameters(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def info():
    return {"torch": torch.__version__, "multivae": _version("multivae"), "pythae": _version("pythae"),
            "torchvision": getattr(torchvision, "__version__", "?"),
            "torchvision_stub": bool(getattr(torchvision, "STUB", False)),
            "num_threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "num_interop_threads": torch.get_num_interop_threads(),
            "python": sys.version.split()[0], "pid": os.getpid()}


def _version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def handle(request, contestants):
    cmd = request["cmd"]
    if cmd == "info":
        return info()
    if cmd == "build":
        started = time.perf_counter()
        c = contestants[request["name"]] = Contestant(request)
        first = c.steps(1)
        c.steps(request.get("warmup", 3))
        return {"parameters": c.parameters(), "first_step_seconds": first["wall"],
                "build_seconds": time.perf_counter() - started}
    if cmd == "time":
        return contestants[request["name"]].steps(request["steps"])
    raise ValueError(f"unknown command {cmd!r}")


def main():
    out = sys.stdout
    sys.stdout = sys.stderr  # only replies go to the pipe
    contestants = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **handle(request, contestants)}
        except Exception as e:  # noqa: BLE001  (reported to the driver, which stops)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
