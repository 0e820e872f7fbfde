"""The research application built on the library: run configs, the ``pfa-jax`` command, data, run
directories (metrics, plots, checkpoints) and the experiment runner's training loop.

* ``config``: run configs (``ml_collections.ConfigDict``), command-line overrides, validation;
  ``own_model``: a config's ``model = 'package.module:factory'``;
* ``experiment``: one run from a config into a run directory; ``sources``: in-memory and streamed
  training data behind one interface; ``data``: Fashion-MNIST IDX files, MNIST / CIFAR-10 through
  tensorflow-datasets; ``streaming``: ImageNet from array_record files;
* ``checkpoint``: orbax checkpoints of a ``TrainState``; ``plots``: a run's curves; ``events``: its
  TensorBoard event files; ``cli``: the command.

Nothing here is imported by ``import pfa_jax``; import the modules you use, e.g.
``from pfa_jax.app import data``.
"""

__all__ = ["checkpoint", "cli", "config", "data", "events", "experiment", "own_model", "plots",
           "pretrain", "sources", "streaming"]
