"""The public API is curated: the modules ``pfa_jax`` exports promise at most 70 names between them
(each module's ``__all__``), every promised name exists, and the entry points users call are among
them."""
import pfa_jax as pj


def test_the_exported_modules_promise_at_most_70_names_and_each_exists():
    promised = {m: getattr(pj, m).__all__ for m in pj.__all__}
    assert sum(map(len, promised.values())) <= 70
    missing = [f"{m}.{n}" for m, names in promised.items() for n in names
               if not hasattr(getattr(pj, m), n)]
    assert missing == []


def test_the_entry_points_are_promised():
    for name in ("rules.get", "models.get", "nn.Dense", "nn.with_rule", "nnx.with_rule",
                 "train.create_train_state", "train.train_step", "train.eval_step",
                 "train.train_epoch", "train.evaluate", "metrics.alignment", "metrics.sharpness",
                 "population.create", "optim.scheduled", "losses.next_token"):
        module, attribute = name.split(".")
        assert attribute in getattr(pj, module).__all__, name
