"""Populations: ``P`` members of one model, rule and optimizer trained as one program.

A ``Population`` is the members' ``TrainState``s stacked on a leading member axis, stepped by
``pfa_jax.train``'s own step, so every member takes exactly the steps of its single run (to float32
rounding). Members differ in their key (parameters, feedback, RNG streams), in the optimizer's
scalar hyper-parameters (``tx`` is then a factory ``tx(**hyperparams)``, called again with traced
scalars inside every compiled step, so it must use ``jnp`` arithmetic only, as optax's aliases do),
in each epoch's shuffle (one epoch key each) and in a rule's init-only options
(``pfa_jax.rules.Rule.init_only``: the soft alignment ``rho``, which shapes only the feedback drawn
at init; ``stack`` the members' states, each created with its own model). The model and every other
rule option are one program: members that differ there are different populations (``stack``
refuses them).

``strategy``: ``"vmap"`` (``jax.vmap`` of the step over the members inside one ``jit``: what fills
an accelerator) or ``"sequential"`` (the members one after another through one compiled
single-member step or epoch, shared by all: on CPU, where vmap measured slower); ``"auto"``
(``resolve``) is ``"sequential"`` on CPU and ``"vmap"`` elsewhere. Results carry the member axis
first. ``train_step`` and ``train_epoch`` donate the population passed in unless ``donate=False``.
``shard`` lays the member axis over a mesh's ``"member"`` axis (``mesh``). The repository's
``docs/populations.md`` has the whole story and the measurements.

Example:

>>> import jax, optax, pfa_jax as pj
>>> model = pj.models.get("ffn2", rule="pfa", widths=(16,))
>>> images, labels = jax.numpy.ones((8, 28, 28, 1)), jax.numpy.arange(8) % 10
>>> pop = pj.population.create(jax.random.split(jax.random.key(0), 3), model, images[:1],
...                            optax.sgd, learning_rate=[0.1, 0.05, 0.01], momentum=0.9)
>>> pop.size
3
>>> pop, metrics = pj.population.train_step(pop, {"image": images, "label": labels})
>>> metrics["loss"].shape
(3,)
>>> pj.population.evaluate(pop, images, labels)["accuracy"].shape
(3,)
>>> pop.hyperparams["learning_rate"]
Array([0.1 , 0.05, 0.01], dtype=float32)
>>> pj.population.member(pop, 2).step  # a single run's TrainState
Array(1, dtype=int32)
"""
from pfa_jax.population._members import Population, create, member, stack
from pfa_jax.population._sharding import MEMBER, mesh, shard
from pfa_jax.population._training import STRATEGIES, apply, evaluate, resolve, train_epoch, train_step

__all__ = ["apply", "create", "evaluate", "member", "mesh", "Population", "shard", "stack",
           "train_epoch", "train_step"]
