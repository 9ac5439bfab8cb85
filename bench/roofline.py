"""A roofline of the training step: the FLOPs of one step against what this CPU does with TensorFlow.

Peak: a large float32 matmul and a large convolution, in FLOP/s. Work: the FLOPs of one
training step of bmvae_m and mmvae at K = 1 and K = 30 on the MNIST-SVHN networks (Table 3:
MNIST MLP 784-400-20, SVHN CNN 32-64-128, latent 20; batch 128), counted two ways that must
agree: analytically from the layer widths of the config, and from the traced step's graph (every
MatMul and convolution op with its static shapes). The TF profiler's float_ops is reported
beside them (it overcounts the kernel-4 `valid` layers, see `graph_flops`).

Everything is timed in interleaved rounds of one run (the peak kernels, every step, and the
parts that explain K = 1: an empty tf.function, the optimizer update alone, and each network's
and each weight layer's forward and backward pass alone at the step's own row counts), so a shared machine's drift hits them
alike; every fraction is the median over rounds of (step FLOP/s) / (that round's peak).

    python bench/roofline.py --rounds 5     # 17 minutes on 2 cores shared with ~10 other processes
    python bench/roofline.py --rounds 2 --no-layers --K 1 --output /tmp/roofline.json   # a quick look

On a shared machine read the CPU clock (see `timed`): wall rates follow the other users' load.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time

import common  # noqa: F401  (puts the repository on the path)
from common import build_step, dataset_manifest, machine, model_config, print_table, random_batch, write_json

DATASET = "mnist-svhn"
FRACTION_TARGET = 0.5   # issue 18: >= 50% of the measured peak at K = 30


# ------------------------------------------------------------------ FLOPs, analytically


def conv_out(side: int, kernel: int, stride: int, padding: str) -> int:
    return -(-side // stride) if padding == "same" else (side - kernel) // stride + 1


def network_layers(spec, model_cfg, part: str) -> list[int]:
    """Multiply-accumulates of each weight layer of one modality's encoder or decoder for ONE
    example (encoder) or ONE latent (decoder), in the order they run: the MLP and CNN networks
    of bmvae_tf/networks.py, from the config's widths and the modality's shape."""
    D = model_cfg.latent_dim
    if len(spec.shape) == 3 and model_cfg.networks.get(spec.name, "auto") != "mlp":
        side, _, colours = spec.shape
        depth = int(math.log2(side // 4))
        widths = list(model_cfg.channels[:depth])
        if part == "encoder":
            macs, s, c_in = [], side, colours
            for w in widths:        # Conv2D k4 s2 same
                s = conv_out(s, 4, 2, "same")
                macs.append(s * s * 16 * c_in * w)
                c_in = w
            return macs + [16 * c_in * D, 16 * c_in * D]   # loc and raw_scale heads: k4 valid to 1x1
        # Transposed convs: every input position meets the whole kernel.
        rev = widths[::-1]
        macs, s = [16 * D * rev[0]], 4                     # stem: 1x1 -> 4x4
        for c_in, c_out in zip(rev, rev[1:] + [colours]):
            macs.append(s * s * 16 * c_in * c_out)
            s *= 2
        return macs
    size = math.prod(spec.shape)
    widths = list(model_cfg.hidden_units)
    if part == "encoder":
        dims = [size, *widths]
        return [a * b for a, b in zip(dims, dims[1:])] + [widths[-1] * D, widths[-1] * D]
    dims = [D, *widths, size]
    return [a * b for a, b in zip(dims, dims[1:])]


def training_flops(layers: list[int], needs_input_grad: bool) -> int:
    """Forward, gradient of the weights and gradient of the input: 2 FLOPs per MAC each. An
    encoder's first layer reads data, whose gradient TensorFlow does not compute."""
    total = 3 * sum(layers)
    if not needs_input_grad:
        total -= layers[0]
    return 2 * total


def decoded_latents(model: str, K: int, M: int) -> int:
    """Latents each decoder decodes per example: BMVAE_M K, MMVAE M*K (Table 1)."""
    return {"bmvae_m": K, "mmvae": M * K}[model]


def analytic_step_flops(manifest, model_cfg, model: str, K: int, batch: int) -> dict:
    M = len(manifest.modalities)
    per_network, total = {}, 0
    for spec in manifest.modalities:
        enc = training_flops(network_layers(spec, model_cfg, "encoder"), needs_input_grad=False)
        dec = training_flops(network_layers(spec, model_cfg, "decoder"), needs_input_grad=True)
        per_network[f"encoder_{spec.name}"] = enc * batch
        per_network[f"decoder_{spec.name}"] = dec * batch * decoded_latents(model, K, M)
        total += per_network[f"encoder_{spec.name}"] + per_network[f"decoder_{spec.name}"]
    return {"total": total, "per_network": per_network}


# ------------------------------------------------------------------ FLOPs, from the graph


def _shape(graph, name):
    from tensorflow.python.framework import graph_util
    return graph_util.tensor_shape_from_node_def_name(graph, name).as_list()


def op_flops(graph, op) -> int | None:
    """2 * MACs of a MatMul or convolution op from its static shapes (None for other ops).
    Convolutions: 2 * (elements of the forward convolution's output) * kh * kw * c_in."""
    t = op.type
    if t == "MatMul":
        a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
        rows = a[1] if op.get_attr("transpose_a") else a[0]
        inner = a[0] if op.get_attr("transpose_a") else a[1]
        cols = b[0] if op.get_attr("transpose_b") else b[1]
        return 2 * rows * inner * cols
    if t == "Conv2D":
        kh, kw, c_in, _ = op.inputs[1].shape.as_list()
        return 2 * math.prod(op.outputs[0].shape.as_list()) * kh * kw * c_in
    if t in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
        filt = op.inputs[1] if t == "Conv2DBackpropInput" else op.outputs[0]
        kh, kw, c_in, _ = filt.shape.as_list()
        return 2 * math.prod(op.inputs[2].shape.as_list()) * kh * kw * c_in
    if t.startswith("BatchMatMul") or t.startswith("Conv3D") or t.startswith("DepthwiseConv"):
        raise ValueError(f"roofline: op {t} is not counted; add it to op_flops")
    return None


def graph_flops(step, batch) -> dict:
    """The traced step's MatMul and convolution FLOPs, op by op, and the TF profiler's count.

    Ops whose output nothing reads are skipped (the gradient of the first convolution's input,
    which the graph holds and TensorFlow's pruning drops). The profiler's registry takes every
    input position of a convolution gradient to meet the whole kernel, so it counts the
    kernel-4 `valid` layers (the SVHN heads and the decoder's stem, 4x4 <-> 1x1) 16 times over;
    its total also holds the element-wise ops."""
    import tensorflow as tf
    graph = step.get_concrete_function(batch).graph
    by_type, skipped = {}, 0
    for op in graph.get_operations():
        flops = op_flops(graph, op)
        if flops is None:
            continue
        if not any(t.consumers() for t in op.outputs):
            skipped += flops
            continue
        by_type[op.type] = by_type.get(op.type, 0) + flops
    out = {"total": sum(by_type.values()), "by_op_type": by_type, "unused_ops_skipped": skipped}
    try:
        opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        opts["output"] = "none"
        out["tf_profiler_float_ops"] = int(tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops)
    except Exception as e:  # noqa: BLE001  (the cross-check is optional)
        out["tf_profiler_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


# ------------------------------------------------------------------ the timed parts


def timed(fn, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process / nproc) per call over n calls, synchronised on
    the last result. The second is what a call would take with both cores to itself if its
    threads kept them busy: on a shared machine it counts only the time our threads ran."""
    import tensorflow as tf
    wall, cpu = time.perf_counter(), time.process_time()
    out = None
    for _ in range(n):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, tf.nest.flatten(out)[:1])
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n / os.cpu_count()


def peak_kernels(args) -> dict:
    """name -> (fn, FLOPs per call): the large matmul and the large convolution."""
    import tensorflow as tf
    n = args.matmul_size
    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    nb, side, c = args.conv_shape
    x = tf.random.uniform([nb, side, side, c])
    w = tf.random.uniform([3, 3, c, c])
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
    return {f"matmul {n}x{n}x{n}": (matmul, 2 * n ** 3),
            f"conv3x3 {nb}x{side}x{side}x{c}->{c}": (conv, 2 * nb * side * side * 9 * c * c)}


def network_pass(network, width: int, rows: int, needs_input_grad: bool):
    """A tf.function: `network`'s forward and backward pass on `rows` random inputs of width,
    back-propagating a random cotangent (as the step's likelihood would; a constant one would let
    oneDNN cache it as a weight)."""
    import tensorflow as tf
    shape = [rows, *width] if isinstance(width, tuple) else [rows, width]
    x = tf.random.uniform(shape)
    cotangents = [tf.random.normal(o.shape) for o in tf.nest.flatten(network(x))]

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            outs = tf.nest.flatten(network(x))
            loss = tf.add_n([tf.reduce_sum(o * c) for o, c in zip(outs, cotangents)])
        sources = list(network.trainable_variables) + ([x] if needs_input_grad else [])
        return tape.gradient(loss, sources)

    return run


def network_sublayers(network, spec) -> list[tuple[str, object, list[int]]]:
    """(name, layer, input shape of one row) of each weight layer of a built MLP or CNN network
    of bmvae_tf/networks.py, in the order of `network_layers`, found by running one row through."""
    import tensorflow as tf
    encoder = network.name.startswith("encoder")
    if hasattr(network, "convs"):
        body = list(network.convs)
    elif hasattr(network, "stem"):
        body = [network.stem, *network.ups, network.out]
    else:
        body = list(network.hidden) + ([] if encoder else [network.out])
    h = tf.zeros([1, *spec.shape]) if encoder else tf.zeros([1, network_latent(network)])
    if encoder and not hasattr(network, "convs"):
        h = tf.reshape(h, [1, -1])
    elif not encoder and hasattr(network, "stem"):
        h = h[:, None, None, :]
    found = []
    for layer in body:
        found.append((layer.name, layer, h.shape.as_list()[1:]))
        h = layer(h)
    if encoder:
        found += [(head.name, head, h.shape.as_list()[1:]) for head in (network.loc_head, network.scale_head)]
    return found


def network_latent(network) -> int:
    first = network.stem if hasattr(network, "stem") else network.hidden[0]
    return int(first.kernel.shape[-1] if hasattr(network, "stem") else first.kernel.shape[0])


def layer_contestants(model, manifest, model_cfg, args, decoder_rows: list[int]) -> dict:
    """Each weight layer of every network, forward and backward alone (random cotangent), at the
    step's row counts: the encoders' at the batch, the decoders' at `decoder_rows`."""
    out = {}
    for spec, encoder, decoder in zip(manifest.modalities, model.encoders, model.decoders):
        for part, network, rows in (("encoder", encoder, [args.batch]), ("decoder", decoder, decoder_rows)):
            macs = network_layers(spec, model_cfg, part)
            for i, ((name, layer, shape), mac) in enumerate(zip(network_sublayers(network, spec), macs)):
                input_grad = part == "decoder" or i > 0
                for n in rows:
                    out[f"{part}_{spec.name}/{i}:{name} x{n}"] = {
                        "fn": network_pass(layer, tuple(shape), n, input_grad), "kind": "layer",
                        "flops": training_flops([mac], input_grad) * n, "calls": args.steps}
    return out


def update_only(trainer):
    """A tf.function: the optimizer's update with zero gradients (Adam over every weight)."""
    import tensorflow as tf
    variables = trainer.model.trainable_variables

    @tf.function
    def run():
        trainer.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
        trainer.step.assign_add(1)
        return trainer.step.read_value()

    return run


def build_contestants(manifest, args) -> tuple[dict, dict]:
    """(contestants, counts): name -> {"fn", "flops", "kind", "calls"}, and the FLOP counts of
    every step (analytic and from its graph)."""
    import tensorflow as tf
    contestants, counts = {}, {}
    for name, (fn, flops) in peak_kernels(args).items():
        fn()
        contestants[name] = {"fn": fn, "flops": flops, "kind": "peak", "calls": args.peak_calls}
    batch = random_batch(manifest, args.batch)
    M = len(manifest.modalities)
    for model in args.models.split(","):
        for K in (int(k) for k in args.K.split(",")):
            config = model_config(DATASET, model, K, batch_size=args.batch)
            step, _ = build_step(config, manifest)
            name = f"{model} K={K}"
            counts[name] = {"analytic": analytic_step_flops(manifest, config.model, model, K, args.batch),
                            "graph": graph_flops(step, batch),
                            "decoded_latents_per_decoder": args.batch * decoded_latents(model, K, M)}
            for _ in range(1 + args.warmup):
                float(step(batch))
            assert step.experimental_get_tracing_count() == 1, name
            contestants[name] = {"fn": (lambda s=step: s(batch)), "kind": "step", "calls": args.steps,
                                 "flops": counts[name]["analytic"]["total"], "model": model, "K": K}
    contestants.update(part_contestants(manifest, args, counts))
    for c in contestants.values():
        c["fn"]()
    empty = tf.function(lambda: tf.constant(0.0))
    contestants["empty tf.function"] = {"fn": empty, "flops": 0, "kind": "overhead", "calls": 50}
    return contestants, counts


def part_contestants(manifest, args, counts) -> dict:
    """Each network's forward + backward pass at the row counts the steps run it on, and the
    optimizer update alone (on a model of its own, so the timed steps' state is untouched)."""
    config = model_config(DATASET, "bmvae_m", 1, batch_size=args.batch)
    _, trainer = build_step(config, manifest)
    model = trainer.model
    out = {"optimizer update": {"fn": update_only(trainer), "flops": 0, "kind": "overhead",
                                "calls": args.steps * 4}}
    rows = sorted({c["decoded_latents_per_decoder"] for c in counts.values()})
    for spec, encoder, decoder in zip(manifest.modalities, model.encoders, model.decoders):
        layers = network_layers(spec, config.model, "encoder")
        out[f"encoder_{spec.name} x{args.batch}"] = {
            "fn": network_pass(encoder, tuple(spec.shape), args.batch, False), "kind": "network",
            "flops": training_flops(layers, False) * args.batch, "calls": args.steps}
        layers = network_layers(spec, config.model, "decoder")
        for n in rows:
            out[f"decoder_{spec.name} x{n}"] = {
                "fn": network_pass(decoder, config.model.latent_dim, n, True), "kind": "network",
                "flops": training_flops(layers, True) * n, "calls": args.steps}
    if args.layers:
        out.update(layer_contestants(model, manifest, config.model, args,
                                     sorted({args.batch, max(r for r in rows if r <= args.batch * 30)})))
    return out


def run_rounds(contestants: dict, rounds: int) -> tuple[dict, list[dict]]:
    """{"wall" | "cpu": {name: [seconds per call, one per round]}} (see `timed`), and each
    round's load: every round times each contestant in turn. cpu_share is this process's CPU
    seconds per wall second over the round (2.0 on 2 cores = both ours)."""
    seconds = {"wall": {name: [] for name in contestants}, "cpu": {name: [] for name in contestants}}
    loads = []
    for r in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for name, c in contestants.items():
            w, u = timed(c["fn"], c["calls"])
            seconds["wall"][name].append(w)
            seconds["cpu"][name].append(u)
        loads.append({"load_average_1m": os.getloadavg()[0],
                      "cpu_share": (time.process_time() - cpu) / (time.perf_counter() - wall)})
        line = []
        for clock in ("wall", "cpu"):
            got = seconds[clock]
            peak = max(c["flops"] / got[n][-1] for n, c in contestants.items() if c["kind"] == "peak")
            line.append(f"{clock}: peak {peak / 1e9:.0f}, " + ", ".join(
                f"{n} {contestants[n]['flops'] / s[-1] / 1e9:.0f}" for n, s in got.items()
                if contestants[n]["kind"] == "step"))
        print(f"  round {r + 1}/{rounds} GFLOP/s {'; '.join(line)}; cpu share {loads[-1]['cpu_share']:.2f}",
              flush=True)
    return seconds, loads


def summarise(contestants: dict, seconds: dict, manifest, batch: int) -> dict:
    """Per-round rates and fractions of that round's peak, their medians and ranges, and where
    each step's time goes (its networks' passes, the optimizer update, the rest)."""
    rounds = len(next(iter(seconds.values())))
    peaks = [max(c["flops"] / seconds[n][r] for n, c in contestants.items() if c["kind"] == "peak")
             for r in range(rounds)]
    rows = []
    for name, c in contestants.items():
        s = seconds[name]
        row = {"name": name, "kind": c["kind"], "seconds_per_call": statistics.median(s),
               "seconds_per_round": s}
        if c["flops"]:
            rates = [c["flops"] / x for x in s]
            fractions = [rate / peak for rate, peak in zip(rates, peaks)]
            row.update(flops=c["flops"], gflops_per_second=statistics.median(rates) / 1e9,
                       fraction_of_peak=statistics.median(fractions),
                       fraction_range=[min(fractions), max(fractions)])
        if c["kind"] == "step":
            row.update(model=c["model"], K=c["K"], examples_per_second=batch / statistics.median(s),
                       parts=step_parts(name, c, contestants, seconds, manifest, batch))
            if c["K"] > 1:
                row.update(target=FRACTION_TARGET, met=row["fraction_of_peak"] >= FRACTION_TARGET)
        rows.append(row)
    return {"peak_gflops_per_round": [p / 1e9 for p in peaks],
            "peak_gflops": statistics.median(peaks) / 1e9, "rows": rows}


def step_parts(name, c, contestants, seconds, manifest, batch) -> dict:
    """Seconds of the step's networks (forward + backward at the step's row counts, timed alone),
    of the optimizer update alone, and the rest (sampling, densities, the bound, dispatch)."""
    M = len(manifest.modalities)
    rows = batch * decoded_latents(c["model"], c["K"], M)
    med = lambda n: statistics.median(seconds[n])  # noqa: E731
    nets = {f"encoder_{m.name}": med(f"encoder_{m.name} x{batch}") for m in manifest.modalities}
    nets.update({f"decoder_{m.name}": med(f"decoder_{m.name} x{rows}") for m in manifest.modalities})
    step_s, update_s = med(name), med("optimizer update")
    network_flops = sum(contestants[f"encoder_{m.name} x{batch}"]["flops"]
                        + contestants[f"decoder_{m.name} x{rows}"]["flops"] for m in manifest.modalities)
    networks_s = sum(nets.values())
    return {"networks_seconds": nets, "networks_total_seconds": networks_s,
            "networks_gflops_per_second": network_flops / networks_s / 1e9,
            "optimizer_update_seconds": update_s, "empty_call_seconds": med("empty tf.function"),
            "rest_seconds": step_s - networks_s - update_s,
            "shares": {"networks": networks_s / step_s, "optimizer_update": update_s / step_s,
                       "rest": (step_s - networks_s - update_s) / step_s}}


def print_report(summary: dict, clock: str) -> None:
    print(f"\n[{clock} clock] peak (median over rounds of the faster kernel): {summary['peak_gflops']:.0f} GFLOP/s")
    table = []
    for r in summary["rows"]:
        row = {"part": r["name"], "ms/call": 1e3 * r["seconds_per_call"]}
        if "flops" in r:
            row.update({"GFLOP": r["flops"] / 1e9, "GFLOP/s": r["gflops_per_second"],
                        "of peak": f"{r['fraction_of_peak']:.0%} ({r['fraction_range'][0]:.0%}-"
                                   f"{r['fraction_range'][1]:.0%})"})
        table.append(row)
    print_table(table, ["part", "ms/call", "GFLOP", "GFLOP/s", "of peak"])
    print(f"\n[{clock} clock] where each step's time goes (networks' passes and the update timed alone, "
          "at the step's shapes):")
    print_table([{"step": r["name"], "step ms": 1e3 * r["seconds_per_call"],
                  "networks ms": 1e3 * r["parts"]["networks_total_seconds"],
                  "networks GFLOP/s": r["parts"]["networks_gflops_per_second"],
                  "update ms": 1e3 * r["parts"]["optimizer_update_seconds"],
                  "rest ms": 1e3 * r["parts"]["rest_seconds"],
                  "empty call ms": 1e3 * r["parts"]["empty_call_seconds"]}
                 for r in summary["rows"] if r["kind"] == "step"],
                ["step", "step ms", "networks ms", "networks GFLOP/s", "update ms", "rest ms", "empty call ms"])


def print_counts(counts: dict) -> None:
    print("\nFLOPs per step: analytic vs the traced graph's MatMul/conv ops (and the TF profiler's float_ops):")
    print_table([{"step": n, "analytic GFLOP": c["analytic"]["total"] / 1e9,
                  "graph GFLOP": c["graph"]["total"] / 1e9,
                  "graph/analytic": c["graph"]["total"] / c["analytic"]["total"],
                  "profiler GFLOP": c["graph"].get("tf_profiler_float_ops", float("nan")) / 1e9}
                 for n, c in counts.items()], ["step", "analytic GFLOP", "graph GFLOP", "graph/analytic",
                                               "profiler GFLOP"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/roofline.json")
    parser.add_argument("--models", default="bmvae_m,mmvae")
    parser.add_argument("--K", default="1,30", help="comma-separated K values")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="calls per step or network pass per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n peak matmul")
    parser.add_argument("--conv-shape", type=int, nargs=3, default=[32, 32, 128], metavar=("N", "SIDE", "C"),
                        help="the peak convolution: N x SIDE x SIDE x C images, 3x3 kernel, C filters")
    parser.add_argument("--peak-calls", type=int, default=5)
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each weight layer alone (encoders at the batch, decoders at the "
                             "batch and at the largest row count up to 30 x the batch)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)   # each network pass is a tf.function of its own
    results = {"machine": machine(), "args": vars(args)}   # the load average at the start
    manifest = dataset_manifest(DATASET)
    contestants, counts = build_contestants(manifest, args)
    for name, c in counts.items():
        if abs(c["graph"]["total"] / c["analytic"]["total"] - 1) > 0.01:
            print(f"WARNING {name}: the graph counts {c['graph']['total']:.4g} FLOPs, the analytic count "
                  f"{c['analytic']['total']:.4g}")
    print(f"timing {len(contestants)} parts in {args.rounds} interleaved rounds", flush=True)
    seconds, loads = run_rounds(contestants, args.rounds)
    print_counts(counts)
    for clock in ("wall", "cpu"):
        results[clock] = summarise(contestants, seconds[clock], manifest, args.batch)
        print_report(results[clock], clock)
    results.update(flop_counts=counts, rounds_load=loads, load_average_at_end=list(os.getloadavg()))
    if args.output:
        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
