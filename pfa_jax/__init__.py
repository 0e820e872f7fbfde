"""pfa_jax: learning without weight transport in JAX/Flax.

    import pfa_jax as pj
    rule = pj.rules.get("pfa", expansion=10)
    model = pj.models.get("ffn2", rule=rule)
    state = pj.train.create_train_state(key, model, sample_batch, {"learning_rate": 0.01})
    state, metrics = pj.train.train_step(state, batch)

The repository's ``docs/index.md`` lists the documentation: ``docs/own_code.md`` (using it from
your own code), ``docs/rules.md`` (the math of every rule and metric), ``docs/nnx.md``,
``docs/scale.md`` (several devices and hosts).
"""
from pfa_jax import augment, fields, layers, losses, metrics, models, nn, nnx, optim, population, rules, train

# the modules a user needs; each promises its user-facing names in its own __all__
__all__ = ["augment", "layers", "losses", "metrics", "models", "nn", "nnx", "optim", "population",
           "rules", "train"]
