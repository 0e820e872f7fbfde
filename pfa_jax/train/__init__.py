"""Training state and pure steps: ``create_train_state``, ``train_step``, ``eval_step``, compiled epochs,
and data parallelism.

One step is one ``jax.value_and_grad`` of the mean cross-entropy over ``(params, plastic feedback)``;
the rules' custom VJPs make the feedback gradients their feedback-learning signals. The state's
optimizer ``tx`` (any ``optax.GradientTransformation``, or the papers' ``OptimizerConfig``, see
``pfa_jax.optim``) steps ``params``; plastic feedback (KP's ``B``, PFA's ``R``) is stepped by
``feedback_tx``, which is ``tx`` itself (a separate state of it) unless another is given. Fixed
feedback is never given to an optimizer, so it stays bit-identical whatever ``tx`` does (clipping,
decoupled decay, Adam). Weight-mirror feedback is stepped by ``mirror`` instead: a mirroring phase in
``create_train_state`` and mirror steps after every training step. Which array is which comes from
the model's layer table (``pfa_jax.layers``). DFA layers get the output error through taps the model
adds to its logits.

Any linen model called as ``model.apply(variables, images, train=bool)`` works: RNG streams other
than ``params`` (e.g. ``dropout``) get a fresh key every step, derived from the state's key and step
per stream (``step_rngs``); a model with an ``axis_name`` field gets it set under ``pmap``. Logged
hyper-parameters come from the optimizer state (``optax.inject_hyperparams``) where it has them.

What enters is checked (``check_batch``), naming the shapes or values refused: images of the
state's ``input_shape`` (the sample's, minus its batch axis), one integer label per image, and
label values in ``[0, num_classes)`` where the labels are concrete (``train_epoch``, ``evaluate``
and the metrics; inside ``jit`` only shapes can be checked, at trace time, for free).

Data parallel, two ways, same numbers as one device:

* ``jax.pmap(train_step, axis_name="batch")`` on replicated state (``replicate``) and a batch split on
  its leading axis (``split_batch``): inside, ``train_step`` sees the bound axis ``"batch"`` and averages
  loss, gradients and feedback signals with ``lax.pmean``; BatchNorm statistics are averaged across
  devices too (the model is cloned with ``axis_name``), so it equals one big batch.
* ``jax.jit(train_step)`` with the batch sharded over a device mesh (``shard_batch``, a
  ``NamedSharding`` over axis ``"batch"``) and the state replicated: XLA partitions the same program.
  ``train_epoch`` and ``evaluate`` take that ``NamedSharding`` as ``sharding=`` and split every
  batch of an in-memory epoch the same way (``pfa_jax.app.placement`` does this for the command).
  The repository's ``docs/scale.md`` shows both.
"""
from pfa_jax.train._creation import create_train_state
from pfa_jax.train._epochs import evaluate, train_epoch
from pfa_jax.train._parallel import (AXIS, batch_mesh, replicate, replicate_on, shard_batch, split_batch,
                                     unreplicate)
from pfa_jax.train._state import (FEEDBACK_STREAM, TrainState, apply_with_rule, check_batch, cross_entropy,
                                  mirror, step_rngs)
from pfa_jax.train._steps import eval_step, train_step

__all__ = ["batch_mesh", "create_train_state", "eval_step", "evaluate", "replicate", "replicate_on",
           "shard_batch", "split_batch", "train_epoch", "train_step", "TrainState", "unreplicate"]
