"""The rest of the field's rules on Fashion-MNIST (offline): Two Routes' alignment family (sa, aa,
ia; Kunin et al. 2020) and DFA's sign and target variants (sdfa; drtp, Frenkel et al. 2021) beside
bp, fa, kp, wm and dfa, with the rules' default options, on the two networks of the other
Fashion-MNIST experiments: ffn2 with the Fig. 2 schedule (40 epochs, ``fig2_fashion_mnist``) and
ResNet-20 with the shortened Fig. 4 schedule of ``resnet20_fashion_mnist`` (15 epochs; DFA and its
variants at lr 0.001 with the authors' output-grid projection). One seed each."""
from experiments.configs import common, resnet20_fashion_mnist

METHODS = (
    ("bp", {"rule.name": "bp"}), ("fa", {"rule.name": "fa"}), ("kp", {"rule.name": "kp"}),
    ("wm", {"rule.name": "wm"}), ("dfa", {"rule.name": "dfa"}),
    ("sdfa", {"rule.name": "dfa", "rule.options.signal": "sign"}),
    ("drtp", {"rule.name": "dfa", "rule.options.signal": "target"}),
    ("sa", {"rule.name": "sa"}), ("aa", {"rule.name": "aa"}), ("ia", {"rule.name": "ia"}),
)


def get_config():
    return common.ffn2_paper("fashion_mnist")


def runs():
    resnet20 = common.differences(get_config(), resnet20_fashion_mnist.get_config())
    return (common.sweep("fig2", seeds=(0,), model=[("ffn2", {})], method=list(METHODS))
            + common.sweep("fig4", seeds=(0,), model=[("resnet20", resnet20)],
                           method=list(METHODS)))
