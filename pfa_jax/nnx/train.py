"""Training NNX models, and the bridge between an NNX model and its linen twin's variables.

    model = pj.nnx.models.get("ffn2", rule="pfa", input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    optimizer = pj.nnx.optimizer(model, optax.sgd(0.01, momentum=0.9))
    step = nnx.jit(pj.nnx.train_step)
    metrics = step(model, optimizer, batch)          # updates model and optimizer in place
    pj.metrics.alignment(model)                      # every pfa_jax.metrics function takes it

``optimizer`` is ``nnx.Optimizer(model, tx, wrt=TRAINED)``, ``TRAINED = nnx.Any(nnx.Param,
PlasticFeedback)``: it steps what the linen ``train_step`` steps, and fixed feedback is never given to
it. (One transformation over parameters and plastic feedback together: for element-wise
optimizers, SGD, momentum, coupled decay, Adam, AdamW, this is exactly linen's separate state per
group; transformations that mix arrays, e.g. global-norm clipping, see both groups at once here.)
``train_step`` is one ``nnx.value_and_grad`` of the mean cross-entropy of a training-mode forward
pass, the optimizer's update and every weight-mirror layer's mirror steps; compile it with
``nnx.jit``, or ``nnx.split`` / ``nnx.merge`` around ``jax.jit``. For data parallelism, place the
state of ``(model, optimizer)`` replicated on a mesh (``pfa_jax.train.replicate_on``) and the batch
sharded over it (``pfa_jax.train.shard_batch``): XLA partitions the same program, BatchNorm
statistics over the global batch.

``to_linen(model)`` gives the ``{'params', 'feedback', 'batch_stats'}`` variables of the model's
linen twin (``model.linen``), ``from_linen(model, variables)`` writes such variables into the NNX
model (a checkpoint trained one way, measured or trained on the other), and ``linen_state(model)``
wraps them as a ``pfa_jax.train.TrainState`` (no optimizer), which is how ``pfa_jax.metrics``
measures NNX models: with the state key ``key`` (default ``jax.random.key(0)``) at step 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pfa_jax import layers as player
from pfa_jax import losses, metrics, train
from pfa_jax.nnx import twin
from pfa_jax.nnx.layers import Feedback, PlasticFeedback, mirror, rule_layers
from pfa_jax.optim import hyperparameters
from pfa_jax.train._steps import all_finite, keep_if_not

__all__ = ["eval_step", "from_linen", "LINEN_COLLECTIONS", "linen_state", "optimizer", "to_linen",
           "train_step", "TRAINED"]

TRAINED = nnx.Any(nnx.Param, PlasticFeedback)
LINEN_COLLECTIONS = {"params": nnx.Param, "feedback": Feedback, "batch_stats": nnx.BatchStat}
_NO_OPTIMIZER = optax.identity()


def optimizer(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the parameters and the plastic feedback of ``model``."""
    return nnx.Optimizer(model, tx, wrt=TRAINED)


def _check(model: nnx.Module, batch: dict, where: str) -> None:
    """``pfa_jax.train.check_batch`` against the model's ``input_shape`` and number of classes
    (where the model has them: the models of ``pfa_jax.nnx.models`` do)."""
    linen = getattr(model, "linen", None)
    train.check_batch(batch["image"], batch["label"], input_shape=getattr(model, "input_shape", ()),
                      num_classes=getattr(linen, "num_classes", 0), where=where)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> dict:
    """One step of the softmax cross-entropy on ``batch``, in place (weight mirrors step too).

    A step whose loss or gradients are not finite leaves the model and the optimizer as they were
    and returns ``nonfinite`` 1.0 (0.0 for a step taken), as ``pfa_jax.train.train_step`` does.

    Args:
      model: an NNX model whose layers follow a rule (``pfa_jax.nnx.models``, ``with_rule``).
      optimizer: ``optimizer(model, tx)``: it steps the parameters and the plastic feedback.
      batch: ``{'image': (n, ...), 'label': (n,)}``.

    Returns:
      ``{'loss', 'accuracy', 'nonfinite'}`` and the hyper-parameters the optimizer state holds
      (``pfa_jax.optim.hyperparameters``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> from flax import nnx
      >>> model = pj.nnx.models.get("ffn2", rule="kp", widths=(16,), input_shape=(8, 8, 1),
      ...                           rngs=nnx.Rngs(0))
      >>> optimizer = pj.nnx.optimizer(model, optax.sgd(0.1))
      >>> batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4)}
      >>> metrics = nnx.jit(pj.nnx.train_step)(model, optimizer, batch)
      >>> sorted(metrics), float(metrics["nonfinite"])
      (['accuracy', 'loss', 'nonfinite'], 0.0)
    """
    _check(model, batch, "nnx train_step")
    def loss_fn(model):
        logits = model(batch["image"], train=True)
        return train.cross_entropy(logits, batch["label"]).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, TRAINED), has_aux=True)(model)
    arrays = lambda: nnx.state((model, optimizer), nnx.Not(nnx.RngState))  # noqa: E731
    before = nnx.to_pure_dict(arrays())
    optimizer.update(model, grads)
    mirror(model)
    finite = all_finite((loss, grads))
    after = arrays()
    nnx.replace_by_pure_dict(after, keep_if_not(finite, nnx.to_pure_dict(after), before))
    nnx.update((model, optimizer), after)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "nonfinite": 1.0 - finite.astype(jnp.float32), **hyperparameters(optimizer.opt_state)}


def eval_step(model: nnx.Module, batch: dict) -> dict:
    """Mean loss and accuracy of the eval-mode model on ``batch``."""
    _check(model, batch, "nnx eval_step")
    logits = model(batch["image"], train=False)
    return {"loss": train.cross_entropy(logits, batch["label"]).mean(),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def to_linen(model: nnx.Module) -> dict:
    """The model's arrays as its linen twin's variables ``{'params', 'feedback', 'batch_stats'}``."""
    return {collection: nnx.to_pure_dict(nnx.state(model, kind))
            for collection, kind in LINEN_COLLECTIONS.items()}


def from_linen(model: nnx.Module, variables) -> None:
    """Writes linen variables (``params``, ``feedback``, ``batch_stats``, as far as given) into
    ``model`` in place, each array into the variable of the same path."""
    for collection, kind in LINEN_COLLECTIONS.items():
        if variables.get(collection):
            state = nnx.state(model, kind)
            nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(variables[collection])))
            nnx.update(model, state)


def linen_state(model: nnx.Module, key: jax.Array | None = None, *,
                loss: losses.Loss = losses.classification) -> train.TrainState:
    """The model as a ``TrainState`` (no optimizer), for the metrics: with the state key ``key``
    (default ``jax.random.key(0)``) at step 0, measuring ``loss`` (``pfa_jax.losses``). A model of
    ``pfa_jax.nnx.models`` is its hand-written linen twin (``model.linen``) with its arrays; any
    other NNX model is its ``pfa_jax.nnx.twin.Twin``, its layer table read off its rule layers."""
    common = dict(step=jnp.zeros((), jnp.int32), opt_state=None,
                  rng=jax.random.key(0) if key is None else key, tx=_NO_OPTIMIZER,
                  feedback_tx=_NO_OPTIMIZER, loss=loss)
    if not hasattr(model, "linen"):
        variables = twin.variables(model)
        records = {path: (layer.rule, layer.kernel[...].ndim, getattr(layer, "view", None))
                   for path, layer in rule_layers(model)}
        made = twin.twin(model)
        return train.TrainState(**common, **variables, model=made,
                                layers=player.from_records(records, variables["params"]),
                                rng_streams=("dropout",) if made.dropout else ())
    variables = to_linen(model)
    sample = jnp.zeros((1,) + tuple(model.input_shape), jnp.float32)
    return train.TrainState(
        **common, params=variables["params"], feedback=variables["feedback"],
        batch_stats=variables["batch_stats"], model=model.linen,
        layers=player.table(model.linen, sample, train=False),
        input_shape=tuple(model.input_shape), num_classes=model.linen.num_classes)


metrics.as_state.register(nnx.Module, linen_state)  # every pfa_jax.metrics function takes NNX models
