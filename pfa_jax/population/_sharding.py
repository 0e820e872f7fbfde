"""The member axis laid over devices."""
from __future__ import annotations


import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pfa_jax import train
from pfa_jax.population._members import Population

MEMBER = "member"  # the mesh axis the member axis is laid over


def mesh(members: int, batch: int = 1, devices=None) -> jax.sharding.Mesh:
    """A mesh of ``members x batch`` devices with axes ``("member", "batch")``."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size != members * batch:
        raise ValueError(f"population.mesh: {members} x {batch} does not use the {devices.size} "
                         "devices; give members * batch == the number of devices")
    return jax.sharding.Mesh(devices.reshape(members, batch), (MEMBER, train.AXIS))


def shard(population: Population, mesh: jax.sharding.Mesh) -> Population:
    """``population`` with its member axis laid over ``mesh``'s ``"member"`` axis (the member count
    a multiple of that axis's size)."""
    ways = mesh.shape[MEMBER]
    if population.size % ways:
        raise ValueError(f"population.shard: {population.size} members do not split over "
                         f"{ways} devices of the mesh's {MEMBER!r} axis")
    return jax.device_put(population, NamedSharding(mesh, PartitionSpec(MEMBER)))
