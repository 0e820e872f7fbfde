"""A character-level transformer language model under the rules, on Debian's fortune cookies
(offline: ``apt-get install -y fortunes fortunes-min``; ``pfa_jax.app.text``: 98-token
vocabulary, every tenth cookie held out, windows of 128 characters), sized for 2 CPU cores:
``transformer_lm`` (2 pre-LN blocks of width 64, 4 heads, MLP 128, causal attention; Flax's own
layers under ``with_rule``), trained on next-character cross-entropy (bits per character reported).

6 rules (bp, fa, kp, pfa, pfa_o, dfa) x 2 seeds, 6 epochs of batch 32 windows x 128 characters
(18,081 training windows, 565 steps an epoch; 2,048 test windows), AdamW (lr 1e-3, decoupled wd
1e-4) as for ``vit_fashion_mnist``: one optimizer for every rule, no per-rule tuning. Per epoch:
the weight angle of every projection kernel (query, key, value, out, MLP, output) and the
gradient angle per layer on the first 256 test windows."""
from experiments.configs import common
from pfa_jax.app.config import default_config

RULES = ("bp", "fa", "kp", "pfa", "pfa_o", "dfa")


def get_config():
    config = default_config()
    config.update({"model": "transformer_lm", "dataset": "fortunes", "epochs": 6,
                   "batch_size": 32})
    config.optimizer.update({"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4})
    return config


def runs():
    return sorted(common.sweep(None, seeds=(0, 1), rules=RULES),
                  key=lambda run: run.labels["seed"])
REPORT = "transformer_report"
