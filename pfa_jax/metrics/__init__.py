"""Measurements of learning without weight transport.

Every function takes a ``TrainState`` (``pfa_jax.train``), or a Flax NNX model of ``pfa_jax.nnx``
(measured as its linen twin: ``pfa_jax.nnx`` registers it with ``as_state``), and a batch
``{'image', 'label'}`` or (where it says ``batches``) a sequence of them, whose means are over all
their examples; none changes the state. Per layer, angles in degrees:

* ``alignment(state)``: ``weight_angle = angle(F, K)`` between each layer's effective feedback ``F``
  and its kernel ``K`` (0 for backprop; for PFA the paper's "path alignment") and
  ``norm_ratio = ||F|| / ||K||``; layers without a kernel-shaped ``F`` (DFA) are left out.
* ``gradient_alignment(state, batch)``: ``grad_angle = angle(dK_rule, dL/dK)`` between the rule's
  kernel gradient and the true one; ``delta_angle = angle(g_rule, g_bp)`` between the error
  ``g = dL/dy`` reaching the layer's output under the rule and the true one; ``delta_norm_rule`` and
  ``delta_norm_bp``: their norms (gradient flow across depth).
* ``sharpness(state, batches)``: top Hessian eigenvalue (power iteration) and Hessian trace (Hutchinson)
  of the loss w.r.t. ``params``, BatchNorm in eval mode.
* ``adversarial(state, batches, epsilons, attack=...)``: clean and robust accuracy under L-inf FGSM or
  PGD; ``attack_images`` returns the perturbed images themselves.
* ``corruption(state, batches, sigmas)``: accuracy under additive Gaussian noise.

The true quantities (gradients, Hessian, input gradients) are plain autodiff of the same forward
function: the state's model applied inside ``pfa_jax.nn.backprop()``, where every rule layer follows
backprop; since every rule leaves the forward pass identical to BP, this is the same function with
the same variables, for any linen model. Rule layers come from the state's layer table
(``pfa_jax.layers``); a layer lifted by ``nn.scan`` / ``nn.vmap`` is reported once per slice,
``path[i]``. Training-mode passes draw every RNG stream (dropout included) from the keys of the
state's next train step (``pfa_jax.train.step_rngs``), the rule's pass and the true one alike.
The metrics' definitions are in the repository's ``docs/rules.md`` (Metrics).
"""
from pfa_jax.metrics._alignment import (alignment, angle, gradient_alignment, kernels_and_feedback,
                                        layer_gradients)
from pfa_jax.metrics._curvature import hessian_vector_product, sharpness
from pfa_jax.metrics._inputs import as_state
from pfa_jax.metrics._robustness import (ATTACKS, GRADIENTS, adversarial, attack_convergence, attack_images,
                                         check_attack, corruption, input_gradient)

__all__ = ["adversarial", "alignment", "angle", "as_state", "attack_convergence", "attack_images",
           "corruption", "gradient_alignment", "sharpness"]
