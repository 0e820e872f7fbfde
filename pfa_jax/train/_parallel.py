"""Data parallelism: ``pmap`` helpers and the batch mesh of sharded ``jit``."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


AXIS = "batch"


def replicate(tree, devices=None):
    """Copies ``tree`` onto every local device along a new leading axis (for ``pmap``)."""
    devices = devices or jax.local_devices()
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), tree)
    return shard_batch(stacked, batch_mesh(devices))


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch, num_devices: int | None = None):
    """``(n, ...) -> (devices, n / devices, ...)`` for ``pmap``."""
    num_devices = num_devices or jax.local_device_count()

    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(f"batch of {x.shape[0]} does not split evenly over {num_devices} devices")
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

    return jax.tree.map(split, batch)


def batch_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all)."""
    return jax.sharding.Mesh(np.asarray(devices or jax.devices()), (AXIS,))


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """Places a batch split along its leading axis over ``mesh``'s ``"batch"`` axis."""
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(AXIS)))


def replicate_on(tree, mesh: jax.sharding.Mesh):
    """Places ``tree`` fully replicated on ``mesh`` (the state for batch-sharded ``jit``), also a
    mesh over several processes' devices: typed PRNG keys (which ``jax.device_put`` does not send
    to other processes' devices) travel as their raw key data and are wrapped again."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)
