"""JAX (pfa_jax) against PyTorch: train-step time of BP and PFA on ffn2 and ResNet-20, and where the
convolution time goes.

PyTorch is not a dependency of pfa_jax; this benchmark imports it and stops with a message if it is
missing (``.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu``).

1. Train steps, all variants of a model measured interleaved (round-robin, ``--repeats`` rounds after
   two warm-up steps): jitted ``pfa_jax.train.train_step`` for ``bp`` and ``pfa`` (expansion 10,
   ``route='auto'``) against an equivalent PyTorch step written here: ``ffn2`` (784-512-512-10, ReLU,
   bias; batch 64) and ResNet-20 (CIFAR option A: 16/32/64 channels, BatchNorm, zero-padded strided
   identity shortcuts, global average pool, fc; batch 128), SGD momentum 0.9, weight decay 1e-4,
   cross entropy, ``zero_grad(set_to_none=True)``, ``torch.set_num_threads(cores)``. PyTorch PFA is
   a ``torch.autograd.Function`` per layer, written the straightforward way (through the mid
   population, ``mid = 10 * out``): dense ``dx = (g Bp) R^T``, ``dR = x^T (g Bp)`` with
   ``R: (in, mid)``, ``Bp: (out, mid)``; conv ``h = `` 1x1 conv of ``g`` with ``Bp``, ``dx`` the input
   gradient of a conv with ``R: (mid, in, kh, kw)``, ``dR`` its weight gradient. ``R`` is stepped by
   the same optimizer, ``Bp`` is a fixed buffer. Also timed: PyTorch PFA through the product
   (``F = R Bp^T`` once, then BP's input gradient; ``dR = dK Bp``), which is what pfa_jax's
   ``route='auto'`` picks for ResNet-20's convolutions.
2. Convolutions: for each distinct convolution of ResNet-20 at the benchmark batch, the forward,
   input-gradient and kernel-gradient convolution timed separately in both frameworks (interleaved):
   ``pfa_jax.rules.ops`` (``ConvOp`` = ``lax.conv_general_dilated`` NHWC/HWIO, ``input_grad``,
   ``kernel_grad``: the ops every rule uses) against ``torch.nn.functional.conv2d``,
   ``torch.nn.grad.conv2d_input`` and ``conv2d_weight`` (NCHW), and their totals weighted by how many
   times ResNet-20 uses each shape.
3. ``--xla-flags-sweep`` (CPU only): the JAX half of 2, plus the JAX ResNet-20 bp step, under several
   ``XLA_FLAGS`` settings of this jaxlib (each in a fresh subprocess, since flags are read once;
   ``--sweep-rounds`` rounds, round-robin over the settings, medians), to see whether any closes the gap.

Prints JSON (also to ``--json PATH``), then markdown tables. JAX runs on ``jax.devices()[0]``,
PyTorch on the CPU (or CUDA when JAX's device is a GPU and torch sees one).

    .venv/bin/python benchmarks/torch_compare.py [--repeats 10] [--xla-flags-sweep]
        [--sweep-rounds 3] [--quick] [--json PATH]

``--quick``: ffn2 batch 16, ResNet-20 batch 8, 2 rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import jax
from common import (IMAGE_SHAPES, interleaved_ms, machine, markdown_table, parser, random_batch,
                    report, step_variant)

import pfa_jax as pj
from pfa_jax.rules import ops

EXPANSION = 10
BATCHES = {"ffn2": 64, "resnet20": 128}
QUICK_BATCHES = {"ffn2": 16, "resnet20": 8}
# (in, out, input size, stride, how many ResNet-20 convs have this shape)
RESNET20_CONVS = [(3, 16, 32, 1, 1), (16, 16, 32, 1, 6), (16, 32, 32, 2, 1), (32, 32, 16, 1, 5),
                  (32, 64, 16, 2, 1), (64, 64, 8, 1, 5)]
FLAG_SETTINGS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",
    "--xla_cpu_multi_thread_eigen=false",
]

# libgomp threads spin-wait by default; with JAX's threads and other processes on the same cores,
# a spinning or descheduled OpenMP thread stalls every PyTorch op (measured here: ResNet-20 torch bp
# step 2.4-3.5 s with spinning against 0.46 s with passive waiting, on 2 loaded cores). Set before
# torch loads; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover -- reported to the user below
    torch = None


# -- PyTorch models ---------------------------------------------------------------------------------
if torch is not None:
    class PFALinearFunction(torch.autograd.Function):
        """``y = x W^T + b``; backward through the mid population (or the product ``F = R Bp^T``)."""

        @staticmethod
        def forward(ctx, x, weight, bias, r, bp, product):
            ctx.save_for_backward(x, weight, r, bp)
            ctx.product = product
            return F.linear(x, weight, bias)

        @staticmethod
        def backward(ctx, g):
            x, weight, r, bp = ctx.saved_tensors
            dw = g.t() @ x                                          # (out, in)
            dx = None
            if ctx.product:
                if ctx.needs_input_grad[0]:
                    dx = g @ (r @ bp.t()).t()                       # g F^T, F = R Bp^T: (in, out)
                dr = dw.t() @ bp                                    # dK Bp
            else:
                h = g @ bp                                          # (n, mid)
                if ctx.needs_input_grad[0]:
                    dx = h @ r.t()
                dr = x.t() @ h                                      # (in, mid)
            return dx, dw, g.sum(0), dr, None, None

    class PFAConvFunction(torch.autograd.Function):
        """3x3 conv without bias; backward through a 1x1 map ``Bp`` and a conv with ``R``."""

        @staticmethod
        def forward(ctx, x, weight, r, bp, stride, padding, product):
            ctx.save_for_backward(x, weight, r, bp)
            ctx.conf = (stride, padding, product)
            return F.conv2d(x, weight, stride=stride, padding=padding)

        @staticmethod
        def backward(ctx, g):
            x, weight, r, bp = ctx.saved_tensors
            stride, padding, product = ctx.conf
            grad = torch.nn.grad
            dw = grad.conv2d_weight(x, weight.shape, g, stride=stride, padding=padding)
            dx = None
            if product:
                if ctx.needs_input_grad[0]:
                    feedback = torch.einsum("mikl,om->oikl", r, bp)
                    dx = grad.conv2d_input(x.shape, feedback, g, stride=stride, padding=padding)
                dr = torch.einsum("oikl,om->mikl", dw, bp)
            else:
                h = F.conv2d(g, bp.t()[:, :, None, None])           # (n, mid, H, W)
                if ctx.needs_input_grad[0]:
                    dx = grad.conv2d_input(x.shape, r, h, stride=stride, padding=padding)
                dr = grad.conv2d_weight(x, r.shape, h, stride=stride, padding=padding)
            return dx, dw, dr, None, None, None, None

    class Linear(nn.Linear):
        def __init__(self, fan_in, out, rule):
            super().__init__(fan_in, out)
            self.rule = rule
            if rule != "bp":
                self.r = nn.Parameter(torch.randn(fan_in, EXPANSION * out) / fan_in ** 0.5)
                self.register_buffer("bp", torch.randn(out, EXPANSION * out) / (EXPANSION * out) ** .5)

        def forward(self, x):
            if self.rule == "bp":
                return super().forward(x)
            return PFALinearFunction.apply(x, self.weight, self.bias, self.r, self.bp,
                                           self.rule == "pfa_product")

    class Conv(nn.Conv2d):
        def __init__(self, cin, out, stride, rule):
            super().__init__(cin, out, 3, stride=stride, padding=1, bias=False)
            self.rule = rule
            if rule != "bp":
                self.r = nn.Parameter(torch.randn(EXPANSION * out, cin, 3, 3) / (9 * cin) ** 0.5)
                self.register_buffer("bp", torch.randn(out, EXPANSION * out) / (EXPANSION * out) ** .5)

        def forward(self, x):
            if self.rule == "bp":
                return super().forward(x)
            return PFAConvFunction.apply(x, self.weight, self.r, self.bp, self.stride, self.padding,
                                         self.rule == "pfa_product")

    class Block(nn.Module):
        def __init__(self, cin, out, stride, rule):
            super().__init__()
            self.conv0, self.bn0 = Conv(cin, out, stride, rule), nn.BatchNorm2d(out)
            self.conv1, self.bn1 = Conv(out, out, 1, rule), nn.BatchNorm2d(out)
            self.pad = out - cin if stride != 1 or cin != out else None

        def forward(self, x):
            y = self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x)))))
            if self.pad is not None:  # option A: strided identity, zero-padded channels
                x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + x)

    class ResNet20(nn.Module):
        def __init__(self, rule, classes=10):
            super().__init__()
            self.stem, self.stem_bn = Conv(3, 16, 1, rule), nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for s, width in enumerate((16, 32, 64)):
                for b in range(3):
                    blocks.append(Block(cin, width, 2 if s and not b else 1, rule))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.output = Linear(64, classes, rule)

        def forward(self, x):
            x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
            return self.output(x.mean((2, 3)))

    class FFN2(nn.Module):
        def __init__(self, rule, classes=10):
            super().__init__()
            self.layers = nn.ModuleList([Linear(784, 512, rule), Linear(512, 512, rule),
                                         Linear(512, classes, rule)])

        def forward(self, x):
            x = x.flatten(1)
            for layer in self.layers[:-1]:
                x = F.relu(layer(x))
            return self.layers[-1](x)


def torch_device():
    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def torch_step_variant(model_name: str, rule: str, batch_size: int):
    torch.manual_seed(0)
    device = torch_device()
    model = (FFN2 if model_name == "ffn2" else ResNet20)(rule).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    h, w, c = IMAGE_SHAPES[model_name]
    x = torch.randn(batch_size, c, h, w, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def compare_steps(model_name: str, batch_size: int, repeats: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    variants = {"jax bp": step_variant(model_name, "bp", batch),
                "jax pfa": step_variant(model_name, pj.rules.get("pfa", expansion=EXPANSION), batch),
                "torch bp": torch_step_variant(model_name, "bp", batch_size),
                "torch pfa (mid)": torch_step_variant(model_name, "pfa", batch_size),
                "torch pfa (product)": torch_step_variant(model_name, "pfa_product", batch_size)}
    times = interleaved_ms(variants, repeats)
    ms = {k: v["median_ms"] for k, v in times.items()}
    return {"batch": batch_size, "timings": times,
            "jax_over_torch": {"bp": ms["jax bp"] / ms["torch bp"],
                               "pfa (vs torch mid)": ms["jax pfa"] / ms["torch pfa (mid)"],
                               "pfa (vs torch product)": ms["jax pfa"] / ms["torch pfa (product)"]},
            "pfa_over_bp": {"jax": ms["jax pfa"] / ms["jax bp"],
                            "torch (mid)": ms["torch pfa (mid)"] / ms["torch bp"],
                            "torch (product)": ms["torch pfa (product)"] / ms["torch bp"]}}


# -- convolutions, piece by piece -------------------------------------------------------------------
def jax_conv_variants(batch_size: int, cin: int, out: int, size: int, stride: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    op = ops.conv_op(2, stride, 1)
    x = jax.random.normal(keys[0], (batch_size, size, size, cin))
    k = jax.random.normal(keys[1], (3, 3, cin, out))
    g = jax.random.normal(keys[2], op(x, k).shape)
    fwd, dx, dk = jax.jit(op), jax.jit(lambda g: ops.input_grad(op, x, k, g)), \
        jax.jit(lambda g: ops.kernel_grad(op, x, k, g))
    return {"jax forward": lambda: fwd(x, k), "jax input grad": lambda: dx(g),
            "jax kernel grad": lambda: dk(g)}


def torch_conv_variants(batch_size: int, cin: int, out: int, size: int, stride: int) -> dict:
    device = torch_device()
    x = torch.randn(batch_size, cin, size, size, device=device)
    k = torch.randn(out, cin, 3, 3, device=device)
    g = torch.randn(batch_size, out, size // stride, size // stride, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def call():
            with torch.no_grad():
                fn()
            sync()
        return call

    return {"torch forward": run(lambda: F.conv2d(x, k, stride=stride, padding=1)),
            "torch input grad": run(lambda: torch.nn.grad.conv2d_input(x.shape, k, g, stride=stride,
                                                                       padding=1)),
            "torch kernel grad": run(lambda: torch.nn.grad.conv2d_weight(x, k.shape, g,
                                                                         stride=stride, padding=1))}


PIECES = ("forward", "input grad", "kernel grad")


def conv_breakdown(batch_size: int, repeats: int, frameworks=("jax", "torch")) -> dict:
    shapes, totals = {}, {f"{fw} {p}": 0.0 for fw in frameworks for p in PIECES}
    for cin, out, size, stride, count in RESNET20_CONVS:
        variants = {}
        if "jax" in frameworks:
            variants.update(jax_conv_variants(batch_size, cin, out, size, stride))
        if "torch" in frameworks:
            variants.update(torch_conv_variants(batch_size, cin, out, size, stride))
        times = {k: v["median_ms"] for k, v in interleaved_ms(variants, repeats).items()}
        shapes[f"{cin}->{out} {size}x{size} s{stride}"] = {"count": count, "ms": times}
        for name, t in times.items():
            # the stem's input gradient is never computed in a train step (it would reach the images)
            uses = 0 if (name.endswith("input grad") and cin == 3) else count
            totals[name] += uses * t
    return {"batch": batch_size, "shapes": shapes, "weighted_total_ms": totals}


# -- XLA flags sweep (CPU) --------------------------------------------------------------------------
def jax_worker(batch_size: int, repeats: int) -> dict:
    """What a sweep subprocess measures under its XLA_FLAGS."""
    batch = random_batch((batch_size,) + IMAGE_SHAPES["resnet20"])
    step = interleaved_ms({"bp": step_variant("resnet20", "bp", batch)}, repeats)["bp"]["median_ms"]
    convs = conv_breakdown(batch_size, repeats, frameworks=("jax",))["weighted_total_ms"]
    return {"resnet20_bp_step_ms": step, **convs}


def flags_sweep(batch_size: int, repeats: int, rounds: int) -> dict:
    runs = {flags: [] for flags in FLAG_SETTINGS}
    errors = {}
    for _ in range(rounds):
        for flags in FLAG_SETTINGS:
            if flags in errors:
                continue
            with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
                env = {**os.environ, "XLA_FLAGS": flags}
                proc = subprocess.run(
                    [sys.executable, __file__, "--jax-worker", out.name, "--batch-size",
                     str(batch_size), "--repeats", str(repeats)],
                    env=env, capture_output=True, text=True, timeout=1200)
                if proc.returncode:
                    errors[flags] = proc.stderr.strip().splitlines()[-1:]
                    continue
                runs[flags].append(json.load(out))
    summary = {}
    for flags, results in runs.items():
        if results:
            summary[flags or "(default)"] = {k: statistics.median(r[k] for r in results)
                                             for k in results[0]}
    return {"batch": batch_size, "rounds": rounds, "results": summary,
            "errors": {k or "(default)": v for k, v in errors.items()}}


# -- output -----------------------------------------------------------------------------------------
def tables(steps: dict, convs: dict, sweep: dict | None) -> dict[str, str]:
    out = {}
    rows = []
    for model_name, r in steps.items():
        ms = {k: v["median_ms"] for k, v in r["timings"].items()}
        rows.append([model_name, r["batch"], ms["jax bp"], ms["torch bp"], r["jax_over_torch"]["bp"],
                     ms["jax pfa"], ms["torch pfa (mid)"], ms["torch pfa (product)"],
                     r["jax_over_torch"]["pfa (vs torch mid)"],
                     r["jax_over_torch"]["pfa (vs torch product)"]])
    out["train step: JAX against PyTorch (ms)"] = markdown_table(
        ["model", "batch", "jax bp", "torch bp", "jax/torch bp", "jax pfa", "torch pfa mid",
         "torch pfa product", "jax/torch pfa (mid)", "jax/torch pfa (product)"], rows)
    rows = []
    for shape, v in convs["shapes"].items():
        rows.append([shape, v["count"]] + [v["ms"][f"{fw} {p}"] for p in PIECES
                                           for fw in ("jax", "torch")])
    tot = convs["weighted_total_ms"]
    rows.append(["ResNet-20 total (x count)", 19] + [tot[f"{fw} {p}"] for p in PIECES
                                                    for fw in ("jax", "torch")])
    out[f"ResNet-20 convolutions, batch {convs['batch']} (ms)"] = markdown_table(
        ["conv", "count"] + [f"{fw} {p}" for p in PIECES for fw in ("jax", "torch")], rows)
    if sweep:
        out[f"XLA_FLAGS sweep, ResNet-20 batch {sweep['batch']} (ms; JAX only)"] = markdown_table(
            ["XLA_FLAGS", "bp step", "conv forward", "conv input grad", "conv kernel grad"],
            [[f"`{k}`", v["resnet20_bp_step_ms"], v["jax forward"], v["jax input grad"],
              v["jax kernel grad"]] for k, v in sweep["results"].items()]
            + [[f"`{k}`", "error: " + " ".join(v)] for k, v in sweep["errors"].items()])
    return out


def main(argv=None) -> None:
    p = parser(__doc__, repeats=10)
    p.add_argument("--xla-flags-sweep", action="store_true")
    p.add_argument("--sweep-rounds", type=int, default=3)
    p.add_argument("--jax-worker", metavar="OUT", help=argparse_hidden())
    p.add_argument("--batch-size", type=int, default=BATCHES["resnet20"], help=argparse_hidden())
    args = p.parse_args(argv)
    if args.jax_worker:
        with open(args.jax_worker, "w") as f:
            json.dump(jax_worker(args.batch_size, args.repeats), f)
        return
    if torch is None:
        sys.exit("torch_compare.py needs PyTorch, which pfa_jax does not depend on: install it "
                 "with `.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu`")
    info = machine()
    threads = info["cpu_cores_usable"]
    torch.set_num_threads(threads)
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_device=str(torch_device()), omp_wait_policy=os.environ["OMP_WAIT_POLICY"])
    batches, repeats = (QUICK_BATCHES, 2) if args.quick else (BATCHES, args.repeats)
    steps = {m: compare_steps(m, b, repeats) for m, b in batches.items()}
    convs = conv_breakdown(batches["resnet20"], repeats)
    sweep = None
    if args.xla_flags_sweep and jax.devices()[0].platform == "cpu":
        sweep = flags_sweep(batches["resnet20"], repeats, 1 if args.quick else args.sweep_rounds)
    report({"benchmark": "torch_compare", "machine": info,
            "config": {"repeats": repeats, "expansion": EXPANSION, "batches": batches,
                       "optimizer": "sgd momentum 0.9, lr 0.01, wd 1e-4", "quick": args.quick},
            "train_steps": steps, "convolutions": convs, "xla_flags_sweep": sweep},
           tables(steps, convs, sweep), args.json)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
