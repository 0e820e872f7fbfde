"""The rest of the field's rules on Fashion-MNIST (offline): Two Routes' alignment family (sa, aa,
ia; Kunin et al. 2020) and DFA's sign and target variants (sdfa; drtp, Frenkel et al. 2021) beside
bp, fa, kp, wm and dfa, on the two networks of the other Fashion-MNIST experiments: ffn2 with the
Fig. 2 schedule (40 epochs, ``fig2_fashion_mnist``) and ResNet-20 with the shortened Fig. 4
schedule of ``resnet20_fashion_mnist`` (15 epochs; DFA and its variants at lr 0.001 with the
authors' output-grid projection). One seed each. The Two Routes rules learn their feedback by SGD
without momentum, at ``lr * scale`` 0.3 (sa), 1 (aa) and 0.03 (ia) per step on ffn2 and 0.3,
0.2 and 0.001 on ResNet-20 (their defaults, stepped with the momentum of 0.9, diverged on ffn2; aa
is stable below ``2 / lambda_max(S)``, up to 9 times smaller for 3x3 convs than for dense layers;
ia's null term only while ``2 lr beta scale lambda_max(K^T S K) < 2``, which the growing kernels
crossed on ffn2 in epoch 6 at 0.3 and in epoch 16 at 0.1, and on ResNet-20's stem within 15 steps
at 0.03: docs/rules.md). ``aa_probe16`` and ``ia_probe16`` are those runs again with the alignment
loss on the first 16 rows of each batch (``probe_batch=16``), the option that brings their
ResNet-20 step within 1.10 x bp (on ResNet-20 aa only, for CPU time). The ResNet-20 runs
of bp, fa, kp and dfa are those of ``resnet20_fashion_mnist``, whose run configs are the same
(``experiments.run`` checks it): listed here, trained and stored there (``common.Run.source``), so
their machine and train time are theirs, and the sweep's wall time counts only the runs trained
here.

DRTP's hidden-layer signal ``-t B / n`` does not shrink as the error does, so in ffn2's ReLU units
(``f' = 1`` while active) it grows the pre-activations without bound; the DRTP authors use tanh
units, whose saturation ends it. ``ffn2_tanh`` runs bp and DFA's family again with tanh hidden
units (``model_options.activation='tanh'``), the Fig. 2 schedule otherwise. sDFA's signal
``sign(e) / n = (1 - 2 t) / n`` does not shrink either; on ResNet-20 (ReLU, BatchNorm) sdfa and drtp
train at losses of about 1e3 and up to 3e5 until the learning rate drops (docs/rules.md)."""
import dataclasses

from experiments.configs import common, resnet20_fashion_mnist

METHODS = (
    ("bp", {"rule.name": "bp"}), ("fa", {"rule.name": "fa"}), ("kp", {"rule.name": "kp"}),
    ("wm", {"rule.name": "wm"}), ("dfa", {"rule.name": "dfa"}),
    ("sdfa", {"rule.name": "dfa", "rule.options.signal": "sign"}),
    ("drtp", {"rule.name": "dfa", "rule.options.signal": "target"}),
)
# DFA and its variants again on ffn2 with tanh hidden units, the DRTP authors' (models/mlp.py)
DFA_FAMILY = ("bp", "dfa", "sdfa", "drtp")
# lr * scale of the Two Routes rules per network (docs/rules.md). sa: any value below 2 is stable.
# aa: below 2 / lambda_max(S), with lambda_max(S) <= 1 (dense) or kh kw = 9 (3x3 convs) on
# normalised probes; ffn2's 1 from 3-epoch probes. ia: the null bound falls as the kernels grow;
# ffn2's 0.03 the largest of 0.3, 0.1, 0.03 whose 40-epoch run stayed finite, ResNet-20's 0.001 a
# third of what kept the stem's feedback stable over 60 steps (its curvature rose from 7 to 340).
RELAXATION = {"ffn2": {"sa": 0.3, "aa": 1.0, "ia": 0.03},
              "resnet20": {"sa": 0.3, "aa": 0.2, "ia": 0.001}}
# Rules run again with their alignment loss on the first PROBE_BATCH rows of each batch
# (``probe_batch``), the option that brings their ResNet-20 b128 step within 1.10 x bp
# (benchmarks/README.md): does the subsample train as well? On ResNet-20 only aa, for CPU time.
PROBE_BATCH = 16
PROBED = {"ffn2": ("aa", "ia"), "resnet20": ("aa",)}
# ResNet-20 methods whose runs are resnet20_fashion_mnist's
SHARED = ("bp", "fa", "kp", "dfa")


def get_config():
    return common.ffn2_paper("fashion_mnist")


def methods(model: str, learning_rate: float) -> list:
    """METHODS and the Two Routes rules, their ``scale`` set for ``model``'s ``RELAXATION`` at
    ``learning_rate``, and ``model``'s ``PROBED`` rules again as ``{rule}_probe{PROBE_BATCH}``."""
    two_routes = [
        (name, {"rule.name": name, "rule.options.scale": round(rate / learning_rate, 6),
                "optimizer.feedback": {"momentum": 0.0}})
        for name, rate in RELAXATION[model].items()]
    probed = [(f"{name}_probe{PROBE_BATCH}", {**options, "rule.options.probe_batch": PROBE_BATCH})
              for name, options in two_routes if name in PROBED[model]]
    return list(METHODS) + two_routes + probed


def runs():
    base, resnet20 = get_config(), resnet20_fashion_mnist.get_config()
    return (common.sweep("fig2", seeds=(0,), model=[("ffn2", {})],
                         method=methods("ffn2", base.optimizer.learning_rate))
            + [_shared(run) for run in common.sweep(
                "fig4", seeds=(0,), model=[("resnet20", common.differences(base, resnet20))],
                method=methods("resnet20", resnet20.optimizer.learning_rate))]
            + common.sweep("fig2", seeds=(0,), model=[("ffn2_tanh", {"model_options.activation": "tanh"})],
                           method=[m for m in METHODS if m[0] in DFA_FAMILY]))


def _shared(run: common.Run) -> common.Run:
    """``run``, sourced from ``resnet20_fashion_mnist`` where its method is in ``SHARED``."""
    method, seed = run.labels["method"], run.labels["seed"]
    return (dataclasses.replace(run, source=f"resnet20_fashion_mnist/{method}-seed{seed}")
            if method in SHARED else run)
