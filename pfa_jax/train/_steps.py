"""The pure steps: ``train_step`` (with its non-finite guard) and ``eval_step``."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from jax import lax

from pfa_jax import layers as player
from pfa_jax import losses
from pfa_jax.optim import hyperparameters
from pfa_jax.train._parallel import AXIS
from pfa_jax.train._state import TrainState, apply_with_rule, mirror, step_rngs


def _bound(axis_name: str | None) -> bool:
    """Whether ``axis_name`` is a mapped axis here (inside ``pmap`` / ``shard_map``)."""
    if axis_name is None:
        return False
    try:
        lax.axis_index(axis_name)
    except NameError:
        return False
    return True


def train_step(state: TrainState, batch: dict, axis_name: str | None = AXIS):
    """One step of the state's rule on ``batch``. Pure.

    Under ``pmap`` / ``shard_map`` with ``axis_name`` bound, loss, gradients, feedback signals and
    BatchNorm statistics are averaged over that axis.

    Non-finite guard (as ``optax.apply_if_finite``, without its state): a step whose loss or any
    gradient or feedback signal is NaN or infinite (a NaN image, an out-of-range label under
    ``jit``, a diverging learning rate) changes nothing but ``step`` (params, feedback, BatchNorm
    statistics and optimizer state stay as they were) and says so in ``metrics['nonfinite']``
    (1.0; 0.0 for a step taken). ``train_epoch``'s per-step metrics carry it, so
    ``metrics['nonfinite'].sum()`` counts the skipped steps; ``pfa-jax train`` stops at the first
    one (``DivergenceError``), keeping the last good checkpoint.

    Args:
      state: a ``TrainState`` (``create_train_state``).
      batch: ``{'image': (n, ...), 'label': ...}`` (and what the state's loss reads).
      axis_name: the data-parallel axis averaged over where it is bound.

    Returns:
      ``(state, metrics)``: the stepped state, and ``loss``, the loss's aux metrics (``accuracy``
      for the default), ``nonfinite`` and the hyper-parameters the optimizer state holds
      (``pfa_jax.optim.hyperparameters``; a separate ``feedback_tx``'s prefixed ``feedback/``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="fa", widths=(16,))
      >>> batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4)}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch, optax.sgd(0.1))
      >>> state, metrics = jax.jit(pj.train.train_step)(state, batch)
      >>> int(state.step), sorted(metrics)
      (1, ['accuracy', 'loss', 'nonfinite'])
    """
    state.check(batch["image"], batch["label"], "train_step")
    parallel = _bound(axis_name)
    model = state.model
    if parallel and hasattr(model, "axis_name"):
        model = model.clone(axis_name=axis_name)
    rngs = step_rngs(state)
    plastic = state.plastic_feedback()

    def loss_fn(params, plastic):
        variables = {"params": params, "feedback": player.merge(state.feedback, plastic),
                     "batch_stats": state.batch_stats}
        outputs, updates = apply_with_rule(model, variables, batch["image"], True, rngs)
        value, aux = losses.value_and_aux(state.loss, outputs, batch)
        return value, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, plastic)
    if parallel:
        grads, loss, aux = lax.pmean((grads, loss, aux), axis_name)
    param_steps, param_opt = state.tx.update(grads[0], state.opt_state["params"], state.params)
    feedback_steps, feedback_opt = state.feedback_tx.update(grads[1], state.opt_state["feedback"],
                                                            plastic)
    metrics = {"loss": loss, **aux, **hyperparameters(param_opt)}
    if state.feedback_tx is not state.tx:
        metrics.update({f"feedback/{k}": v for k, v in hyperparameters(feedback_opt).items()})
    stepped = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, param_steps),
        feedback=player.merge(state.feedback, optax.apply_updates(plastic, feedback_steps)),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state={"params": param_opt, "feedback": feedback_opt})
    if stepped.mirrored:
        stepped = mirror(stepped)
    finite = all_finite((loss, grads))
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    kept = {k: keep_if_not(finite, getattr(stepped, k), getattr(state, k))
            for k in ("params", "feedback", "batch_stats", "opt_state")}
    return stepped.replace(**kept), metrics


def all_finite(tree) -> jnp.ndarray:
    """Whether every array of ``tree`` holds only finite values (a boolean scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def keep_if_not(finite, new, old):
    """``new`` where ``finite``, else ``old`` (elementwise over two trees of one structure)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def eval_step(state: TrainState, batch: dict) -> dict:
    """The state's loss of the eval-mode model on ``batch``.

    Args:
      state: a ``TrainState``.
      batch: ``{'image', 'label'}``, optionally ``'mask'`` (1 for real examples, 0 for padding,
        which the default loss weights the examples by).

    Returns:
      ``loss``, its aux metrics (``accuracy`` for the default) and ``count``, the number of
      examples (the sum of ``batch['mask']`` where given).

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="kp", widths=(16,))
      >>> batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4),
      ...          "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch)
      >>> float(pj.train.eval_step(state, batch)["count"])
      3.0
    """
    state.check(batch["image"], batch["label"], "eval_step")
    outputs = state.model.apply(state.variables(), batch["image"], train=False)
    loss, aux = losses.value_and_aux(state.loss, outputs, batch)
    count = jnp.sum(batch["mask"]) if "mask" in batch else jnp.shape(batch["image"])[0]
    return {"loss": loss, **aux, "count": jnp.asarray(count, jnp.float32)}
