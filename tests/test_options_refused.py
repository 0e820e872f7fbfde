"""Every option is used or refused: options that would be ignored or silently altered (feedback
optimizer overrides for rules without plastic feedback, their schedules, a probe batch larger than
the batch, a misspelt layer of an NNX rule mapping) give errors naming the key and what is valid."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import pfa_jax as pj
from pfa_jax.app import config as config_lib
from pfa_jax.app import spec
from pfa_jax.optim import OptimizerConfig


@pytest.mark.parametrize("rule, feedback, message", [
    ("fa", {"weight_decay": 0.0}, "configures the optimizer of plastic feedback, which rule 'fa' "
     "does not have \\(rules with plastic feedback: kp, pfa"),
    ("kp", {"lr_milestones": (5,)}, r"optimizer.feedback.lr_milestones=\(5,\) has milestone\(s\) "
     r"\[5\] at or beyond epochs=3"),
    ("kp", {"momentum": -1.0}, "optimizer.feedback.momentum=-1.0 must be"),
    ("kp", {"nope": 1}, r"unknown optimizer.feedback option\(s\) \['nope'\]"),
])
def test_feedback_optimizer_options_are_used_or_refused(rule, feedback, message):
    config = config_lib.default_config()
    config.rule.name = rule
    config_lib.set_value(config, "optimizer.feedback", feedback)
    with pytest.raises(ValueError, match=message):
        spec.resolve(config)


def test_feedback_overrides_must_be_a_mapping():
    with pytest.raises(ValueError, match="optimizer.feedback='x' must be a dict of overrides"):
        OptimizerConfig.create({"feedback": "x"})


def test_a_probe_batch_larger_than_the_batch_is_refused():
    model = pj.models.get("ffn2", rule=pj.rules.get("sa", probe_batch=16), widths=(8,))
    with pytest.raises(ValueError, match="sa: probe_batch=16 exceeds the 4 rows of the batch"):
        pj.train.create_train_state(jax.random.key(0), model, jnp.zeros((4, 28, 28, 1)),
                                    optax.sgd(0.1))


@pytest.mark.parametrize("name", ["ffn2", "vit"])
def test_an_nnx_rule_mapping_with_a_misspelt_layer_is_refused(name):
    with pytest.raises(pj.nn.RuleMapError, match=r"unknown layer\(s\) \['ouput'\]"):
        pj.nnx.models.get(name, rule={"default": "fa", "ouput": "bp"}, num_classes=10,
                          input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
