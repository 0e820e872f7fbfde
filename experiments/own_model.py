"""pfa_jax from research code: an own Flax model, an own optax optimizer, an own training loop.

    python -m experiments.own_model --rule pfa --epochs 2          # Fashion-MNIST, offline
    python -m experiments.own_model --rule kp --steps 20 --limit 2000

The model is a small convolutional network with BatchNorm and Dropout whose ``pfa_jax.nn`` layers
follow ``--rule`` (the output layer follows backprop, a common choice); the optimizer is an optax
chain with global-norm clipping and AdamW on a warm-up cosine schedule (the learning rate injected,
so ``train_step`` logs it). Every epoch prints test accuracy and the angle between each layer's
feedback and its forward weights (``pfa_jax.metrics.alignment``).
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pfa_jax as pj
from pfa_jax.app import data as app_data


class SmallConvNet(nn.Module):
    """conv 16@3x3 /2 - BN - ReLU - conv 32@3x3 /2 - BN - ReLU - dense 64 - Dropout - output."""

    rule: str = "pfa"
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate((16, 32)):
            x = pj.nn.Conv(features, (3, 3), strides=2, use_bias=False, rule=self.rule,
                           name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        x = nn.relu(pj.nn.Dense(64, rule=self.rule, name="hidden")(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return pj.nn.Dense(10, rule="bp", name="output")(x)


def optimizer(steps: int, peak: float = 3e-3) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), steps)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=schedule,
                                                             weight_decay=1e-4))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="pfa", help=f"one of {', '.join(pj.rules.names())}")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use the first N examples")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory")
    args = parser.parse_args(argv)

    data = app_data.load("fashion_mnist", data_dir=args.data_dir, limit=args.limit)
    steps_per_epoch = len(data.train_labels) // args.batch_size
    total = args.steps or args.epochs * steps_per_epoch
    state = pj.train.create_train_state(jax.random.key(0), SmallConvNet(rule=args.rule),
                                        data.train_images[:1], optimizer(total))
    step = jax.jit(pj.train.train_step, donate_argnums=0)
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        order = rng.permutation(len(data.train_labels))
        for i in range(steps_per_epoch):
            if int(state.step) >= total:
                break
            rows = order[i * args.batch_size:(i + 1) * args.batch_size]
            state, metrics = step(state, {"image": jnp.asarray(data.train_images[rows]),
                                          "label": jnp.asarray(data.train_labels[rows])})
        test = pj.train.evaluate(state, data.test_images, data.test_labels)
        angles = {layer: round(float(a["weight_angle"]), 1)
                  for layer, a in pj.metrics.alignment(state).items()}
        print(f"epoch {epoch + 1}: step {int(state.step)}, train loss {float(metrics['loss']):.4f}, "
              f"lr {float(metrics['learning_rate']):.2e}, test accuracy "
              f"{100 * float(test['accuracy']):.2f}%, feedback angles {angles}")
    return {"test_accuracy": float(test["accuracy"]), "alignment": angles,
            "learning_rate": float(metrics["learning_rate"]), "steps": int(state.step)}


if __name__ == "__main__":
    main()
