"""Weight mirror (Akrout et al. 2019, "Deep learning without weight transport").

Errors go down through a kernel-shaped ``B``, ``dx = g B^T``; the optimizer never touches ``B``.
Instead a mirror step feeds zero-mean noise ``xi ~ N(0, sigma^2)`` through the layer's own linear map
and lets ``B`` learn the input-output correlation with decay:

    B <- (1 - decay) B + rate * xi^T (xi K) / n          (E[xi^T xi] / n = sigma^2 I)

so ``B`` tracks ``(rate / decay) sigma^2 K``: the kernel up to scale (exactly ``K`` with the defaults
``rate = decay``, ``sigma = 1``). For a conv kernel ``(kh, kw, in, out)`` the noise is one input
patch per sample, i.e. the map on flattened patches ``(kh * kw * in, out)``: the same correlation for
any stride, padding, dilation or feature grouping.

Options: ``sigma`` (noise std), ``rate``, ``decay``, ``noise_batch`` (n), ``steps`` (mirror steps
after every training step) and ``warmup_steps`` (the mirroring phase run once before training by
``pfa_jax.train.create_train_state``). ``B`` starts as an independent draw (``rho`` soft-aligns it).
"""
from __future__ import annotations

import dataclasses

import jax
from jax import lax

from pfa_jax.rules.base import DrawnFeedbackRule

__all__ = ["WM"]


@dataclasses.dataclass(frozen=True)
class WM(DrawnFeedbackRule):
    name = "wm"
    mirrored = ("B",)

    sigma: float = 1.0
    rate: float = 0.05
    decay: float = 0.05
    noise_batch: int = 256
    steps: int = 1
    warmup_steps: int = 200

    def __post_init__(self):
        super().__post_init__()
        for key in ("sigma", "rate"):
            if not getattr(self, key) > 0:
                raise ValueError(f"wm: {key}={getattr(self, key)!r} must be positive")
        if not 0 < self.decay <= 1:
            raise ValueError(f"wm: decay={self.decay!r} must lie in (0, 1]")
        for key in ("noise_batch", "steps", "warmup_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (1 if key == "noise_batch" else 0):
                raise ValueError(f"wm: {key}={value!r} must be a "
                                 f"{'positive' if key == 'noise_batch' else 'non-negative'} int")

    def feedback_kernel(self, kernel, feedback, key):
        return lax.stop_gradient(feedback["B"])

    def mirror(self, key, kernel, feedback, warmup):
        matrix = kernel.reshape(-1, kernel.shape[-1])

        def step(i, b):
            xi = self.sigma * jax.random.normal(jax.random.fold_in(key, i),
                                                (self.noise_batch, matrix.shape[0]), kernel.dtype)
            return (1 - self.decay) * b + self.rate * (xi.T @ (xi @ matrix)) / self.noise_batch

        b = lax.fori_loop(0, self.warmup_steps if warmup else self.steps, step,
                          feedback["B"].reshape(matrix.shape))
        return {**feedback, "B": lax.stop_gradient(b.reshape(kernel.shape))}
