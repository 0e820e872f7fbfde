"""Populations (pfa_jax.population): every member of a population of 4 (different seeds and learning
rates) equals its own single run after an epoch, for every rule family and PFA storage form; the
member axis laid over 4 devices gives the same numbers; a diverging member is skipped by the guard
while the others train; donation is explicit; bad input is refused by name."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax as pj

LEARNING_RATES = (0.05, 0.02, 0.05, 0.01)
RULES = {"bp": {}, "fa": {}, "kp": {}, "wm": {}, "dfa": {},
         "pfa-R": {"expansion": 2, "form": "R"}, "pfa-F": {"expansion": 2, "form": "F"},
         "pfa-G": {"expansion": 2, "form": "G"}}

QUICK = ("bp", "kp", "dfa", "pfa-G")  # the default tier; the others under -m slow


def data(n=64):
    key = jax.random.key(7)
    return jax.random.uniform(key, (n, 8, 8, 1)), jax.random.randint(jax.random.key(8), (n,), 0, 10)


def model(case):
    return pj.models.get("ffn2", rule=pj.rules.get(case.split("-")[0], **RULES[case]),
                         widths=(16,), num_classes=10)


def assert_trees_close(actual, expected):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), actual, expected)


@pytest.mark.parametrize("case", [case if case in QUICK else pytest.param(case, marks=pytest.mark.slow)
                                  for case in RULES])
def test_each_member_equals_its_single_run(case):
    images, labels = data()
    keys = jax.random.split(jax.random.key(0), 4)
    epoch_keys = jax.random.split(jax.random.key(1), 4)
    net = model(case)
    trained = {}
    for strategy in pj.population.STRATEGIES[1:]:
        pop = pj.population.create(keys, net, images[:1], optax.sgd, learning_rate=LEARNING_RATES,
                                   momentum=0.9)
        trained[strategy] = pj.population.train_epoch(pop, images, labels, epoch_keys, 16,
                                                      loop="scan", strategy=strategy)
        assert trained[strategy][1]["loss"].shape == (4, 4)
    txs = {lr: optax.sgd(lr, momentum=0.9) for lr in set(LEARNING_RATES)}  # one program per lr
    for i, lr in enumerate(LEARNING_RATES):
        single = pj.train.create_train_state(keys[i], net, images[:1], txs[lr])
        single, steps = pj.train.train_epoch(single, images, labels, epoch_keys[i], 16, loop="scan")
        for pop, metrics in trained.values():
            got = pj.population.member(pop, i)
            assert_trees_close((got.params, got.feedback, got.opt_state),
                               (single.params, single.feedback, single.opt_state))
            np.testing.assert_allclose(metrics["loss"][i], steps["loss"], rtol=2e-5)
    for strategy, (pop, _) in trained.items():
        evaluation = pj.population.evaluate(pop, images, labels, batch_size=32, strategy=strategy)
        assert evaluation["accuracy"].shape == (4,)
        np.testing.assert_allclose(evaluation["loss"][3], pj.train.evaluate(
            pj.population.member(pop, 3), images, labels, batch_size=32)["loss"], rtol=2e-5)


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_members_may_differ_in_the_soft_alignment_rho(strategy):
    """FA members whose feedback was soft-aligned to cosines rho = None, 0.5, 0.9 at init are one
    program: each equals its single run, starts at its own cosine and keeps its own model."""
    images, labels = data()
    keys = jax.random.split(jax.random.key(0), 3)
    rhos = (None, 0.5, 0.9)
    nets = [pj.models.get("ffn2", rule=pj.rules.get("fa", rho=rho), widths=(16,), num_classes=10)
            for rho in rhos]
    tx = optax.sgd(0.05)
    singles = [pj.train.create_train_state(k, net, images[:1], tx) for k, net in zip(keys, nets)]
    pop = pj.population.stack(singles)
    for i, rho in enumerate(rhos[1:], 1):
        angle = pj.metrics.alignment(pj.population.member(pop, i))["hidden_0"]["weight_angle"]
        np.testing.assert_allclose(angle, np.degrees(np.arccos(rho)), atol=1e-3)
    epoch_keys = jax.random.split(jax.random.key(1), 3)
    pop, _ = pj.population.train_epoch(pop, images, labels, epoch_keys, 16, strategy=strategy)
    for i, single in enumerate(singles):
        single, _ = pj.train.train_epoch(single, images, labels, epoch_keys[i], 16)
        got = pj.population.member(pop, i)
        assert got.model == nets[i].clone(rule=got.model.rule) and got.model.rule.rho == rhos[i]
        assert_trees_close((got.params, got.feedback), (single.params, single.feedback))


def test_the_member_axis_over_four_devices_gives_the_same_numbers():
    images, labels = data()
    pop = pj.population.create(jax.random.split(jax.random.key(0), 8), model("pfa-G"), images[:1],
                               optax.sgd, learning_rate=0.05, momentum=0.9)
    batch = {"image": images[:16], "label": labels[:16]}
    plain, plain_metrics = pj.population.train_step(pop, batch, donate=False, strategy="vmap")
    for members, rows in ((4, 1), (2, 2)):
        mesh = pj.population.mesh(members, rows, jax.devices()[:4])
        sharded = pj.population.shard(pop, mesh)
        leaf = jax.tree.leaves(sharded.state.params)[0]
        assert leaf.sharding.spec[0] == pj.population.MEMBER
        assert len(leaf.addressable_shards) == 4 and leaf.addressable_shards[0].data.shape[0] == 8 // members
        placed = jax.device_put(batch, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(pj.train.AXIS)))
        stepped, metrics = pj.population.train_step(sharded, placed, donate=False, strategy="vmap")
        assert_trees_close(stepped.state.params, plain.state.params)
        np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=2e-5)


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_a_diverging_member_is_skipped_while_the_others_train(strategy):
    images, labels = data()
    images = images.at[0].set(jnp.nan)  # member 1 sees the NaN image in its first batch only
    pop = pj.population.create(jax.random.split(jax.random.key(0), 3), model("fa"), images[:1],
                               optax.sgd, learning_rate=0.05)
    before = jax.tree.map(np.asarray, pop.state.params)
    batches = {"image": jnp.stack([images[1:17], images[:16], images[17:33]]),
               "label": jnp.stack([labels[1:17], labels[:16], labels[17:33]])}
    pop, metrics = pj.population.train_step(pop, batches, per_member=True, strategy=strategy)
    np.testing.assert_array_equal(metrics["nonfinite"], [0.0, 1.0, 0.0])
    after = pop.state.params
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(new[1], old[1])
        assert np.all(np.isfinite(new)) and not np.array_equal(new[0], old[0])


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_donation_is_explicit(strategy):
    images, labels = data()
    pop = pj.population.create(jax.random.split(jax.random.key(0), 2), model("bp"), images[:1],
                               optax.sgd(0.1))
    batch = {"image": images[:8], "label": labels[:8]}
    kept, _ = pj.population.train_step(pop, batch, donate=False, strategy=strategy)
    assert not jax.tree.leaves(pop.state.params)[0].is_deleted()
    pj.population.train_step(kept, batch, strategy=strategy)
    assert jax.tree.leaves(kept.state.params)[0].is_deleted()


def test_auto_is_sequential_on_cpu_and_a_bad_strategy_is_named():
    assert pj.population.resolve("auto") == ("sequential" if jax.default_backend() == "cpu"
                                              else "vmap")
    with pytest.raises(ValueError, match="strategy='pmap' is unknown; valid: auto, vmap, sequential"):
        pj.population.resolve("pmap")


def test_every_metric_runs_per_member():
    images, labels = data()
    pop = pj.population.create(jax.random.split(jax.random.key(0), 3), model("kp"), images[:1],
                               optax.sgd(0.05))
    angles = pj.population.apply(pj.metrics.alignment, pop)
    layer = next(iter(angles))
    assert angles[layer]["weight_angle"].shape == (3,)
    single = pj.metrics.alignment(pj.population.member(pop, 2))
    np.testing.assert_allclose(angles[layer]["weight_angle"][2], single[layer]["weight_angle"])


def test_bad_populations_are_refused_by_name():
    images, _ = data()
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match=r"learning_rate=\(0.1, 0.2, 0.3\) must be a scalar or one "
                                         r"value per member \(2\)"):
        pj.population.create(keys, model("bp"), images[:1], optax.sgd, learning_rate=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match=r"hyper-parameters \['learning_rate'\] are given per member, "
                                         "so tx must be a factory"):
        pj.population.create(keys, model("bp"), images[:1], optax.sgd(0.1), learning_rate=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"keys of shape \(\); give one key per member"):
        pj.population.create(jax.random.key(0), model("bp"), images[:1], optax.sgd(0.1))
    states = [pj.train.create_train_state(k, model(case), images[:1], optax.sgd(0.1))
              for k, case in zip(keys, ("fa", "kp"))]
    with pytest.raises(ValueError, match="member 1's model or loss differs from member 0's"):
        pj.population.stack(states)
    pop = pj.population.create(keys, model("bp"), images[:1], optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"\(3,\) epoch keys for 2 members"):
        pj.population.train_epoch(pop, images, jnp.zeros(64, jnp.int32), jax.random.split(keys[0], 3), 8)
    with pytest.raises(ValueError, match="2 members do not split over 4 devices"):
        pj.population.shard(pop, pj.population.mesh(4, 1, jax.devices()[:4]))


def test_the_module_examples_run():
    assert doctest.testmod(pj.population).failed == 0
    assert doctest.testmod(pj.optim).failed == 0
