"""The soft-alignment paper's four claims (Cheon, Bae & Paik 2025), tested on the runs of a seeded
experiment (``soft_alignment_seeds``): per feedback setting, the mean and a 95 % interval over
seeds (Student's t, ``mean +- t_{0.975, n-1} s / sqrt(n)``) of every quantity a claim rests on, a
verdict per claim by the criterion stated with it, and one figure per claim. Called by
``experiments.report`` for experiments whose config names it (``REPORT = "soft_alignment_claims"``).

The claims and their criteria (``bp`` the backprop runs, ``fa`` plain FA, "soft" the settings
``fa rho=...``; a difference "is" positive or negative where its 95 % Welch interval excludes 0):

1. accuracy: soft alignment reaches bp's accuracy: holds for a setting whose difference to bp is
   not negative; does not hold where every soft setting falls short of bp.
2. smoother gradient flow and flatter minima: the error reaching the first hidden layer, relative
   to the output's (``delta_norm_rule``, first hidden over output: 1 is no loss across depth),
   closer to bp's than FA's is, and a top Hessian eigenvalue and trace no larger than FA's.
3. generalisation and robustness: test accuracy and accuracy under Gaussian noise (relative to
   each run's clean accuracy) above FA's.
4. moderate deviations (rho in 0.25 to 0.9) improve adversarial robustness over bp: robust
   accuracy relative to clean under the run's own PGD *and* under the transfer attack from another
   bp seed above bp's; a gain under the own-gradient attack alone is what gradient masking gives.
"""
from __future__ import annotations

import json
import pathlib
import statistics

from matplotlib.figure import Figure
from scipy import stats

MODERATE = ("fa rho=0.25", "fa rho=0.5", "fa rho=0.75", "fa rho=0.9")
EPSILON = 0.03  # the radius the tables show (pixel units); the figures show every radius
SIGMA = 0.2


def interval(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width of the 95 % t interval)``; the half-width is NaN for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its 95 % Welch interval ``(low, high)``."""
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return statistics.fmean(a) - statistics.fmean(b), float(low), float(high)


def _cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, half = interval([scale * v for v in values])
    return f"{mean:.{digits}f}" if half != half else f"{mean:.{digits}f} ± {half:.{digits}f}"


def quantities(run_dir: pathlib.Path, summary: dict) -> dict:
    """One run's numbers: accuracy, sharpness, error norms across depth, noise and attacks."""
    layers = summary["gradient_alignment"]
    hidden = sorted((k for k in layers if k != "output"), key=lambda k: int(k.split("_")[-1]))
    noise = dict(zip(summary["noise"]["sigmas"], summary["noise"]["accuracy"]))
    values = {"accuracy": summary["test_accuracy"],
              "top_eigenvalue": summary["sharpness"]["top_eigenvalue"],
              "trace": summary["sharpness"]["trace"],
              "depth_profile": [layers[k]["delta_norm_rule"] / layers["output"]["delta_norm_rule"]
                                for k in hidden],
              "noise_relative": noise[SIGMA] / summary["test_accuracy"]}
    values["flow"] = values["depth_profile"][0]
    attacks = run_dir / "attacks.json"
    if attacks.exists():
        result = json.loads(attacks.read_text())
        clean = result["clean_accuracy"]
        i = result["epsilons"].index(EPSILON)
        values.update(attack_clean=clean, epsilons=result["epsilons"],
                      own=[a / clean for a in result["own"]["pgd"]],
                      transfer=[a / clean for a in result["transfer"]["pgd"]],
                      own_abs=result["own"]["pgd"][i], transfer_abs=result["transfer"]["pgd"][i],
                      converged=all(c["converged"] for c in result["convergence"]),
                      pgd_steps=result["pgd_steps"])
        values.update(own_rel=values["own"][i], transfer_rel=values["transfer"][i])
    return values


def exploded(run: dict) -> bool:
    """A finished run whose last training loss exceeds its first epoch's: it diverged with a loss
    that stayed finite (the training loop stops only on non-finite values)."""
    losses = [r["train_loss"] for r in run["records"] if "train_loss" in r]
    return run["state"] == "done" and len(losses) > 1 and losses[-1] > losses[0]


def by_setting(runs: list[dict], exp_dir: pathlib.Path) -> dict[str, list[dict]]:
    settings: dict[str, list[dict]] = {}
    for run in runs:
        if run["state"] == "done" and not exploded(run):
            settings.setdefault(run["labels"]["feedback"], []).append(
                quantities(exp_dir / run["name"], run["summary"]))
    return settings


def _column(members: list[dict], key: str) -> list[float]:
    return [m[key] for m in members if key in m]


def diverged(runs: list[dict]) -> dict[str, list[str]]:
    """Per feedback setting, its diverged runs, each with how (they are in no other column)."""
    failed: dict[str, list[str]] = {}
    for run in runs:
        if run["state"] == "diverged" or exploded(run):
            how = ("non-finite" if run["state"] == "diverged" else
                   f"final loss {run['records'][-1]['train_loss']:.3g}")
            failed.setdefault(run["labels"]["feedback"], []).append(f"{run['name']} ({how})")
    return failed


def table(settings: dict[str, list[dict]], failed: dict[str, list[str]]) -> list[str]:
    header = ["feedback", "seeds (diverged)", "test acc. %", "minus bp (95 % CI)", "top Hessian eig.",
              "Hessian trace", "error norm first hidden / output",
              f"noise {SIGMA}: acc. / clean", f"own PGD {EPSILON} %", "/ clean",
              f"transfer PGD {EPSILON} %", "/ clean", "PGD converged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    bp = _column(settings.get("bp", []), "accuracy")
    for name, members in settings.items():
        accuracy = _column(members, "accuracy")
        gap = ("" if name == "bp" or len(bp) < 2 or len(accuracy) < 2 else
               "{:.2f} [{:.2f}, {:.2f}]".format(*(100 * v for v in difference(accuracy, bp))))
        attacked = _column(members, "own_abs")
        cells = [name, f"{len(members)} ({len(failed.get(name, []))})", _cell(accuracy, 100, 2), gap,
                 _cell(_column(members, "top_eigenvalue")), _cell(_column(members, "trace")),
                 _cell(_column(members, "flow"), digits=3),
                 _cell(_column(members, "noise_relative"), digits=3)]
        if attacked:
            cells += [_cell(attacked, 100), _cell(_column(members, "own_rel"), digits=3),
                      _cell(_column(members, "transfer_abs"), 100),
                      _cell(_column(members, "transfer_rel"), digits=3),
                      f"{sum(_column(members, 'converged'))} of {len(attacked)}"]
        else:
            cells += ["not measured"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _better(a: list[float], b: list[float], larger: bool = True) -> str:
    """``'higher'`` / ``'lower'`` / ``'no difference'`` of ``a`` against ``b`` at 95 %."""
    if len(a) < 2 or len(b) < 2:
        return "not enough seeds"
    _, low, high = difference(a, b)
    if low > 0:
        return "higher" if larger else "larger"
    if high < 0:
        return "lower" if larger else "smaller"
    return "no difference"


def verdicts(settings: dict[str, list[dict]]) -> list[str]:
    """One line per claim, each comparison by the module docstring's criterion."""
    soft = {k: v for k, v in settings.items() if k.startswith("fa rho=")}
    bp, fa = settings.get("bp", []), settings.get("fa", [])
    if not bp or not fa or not soft:
        return ["Verdicts need bp, fa and soft-aligned runs; not all have finished."]
    acc = {k: _column(v, "accuracy") for k, v in settings.items()}
    reach = {k: _better(acc[k], acc["bp"]) for k in soft}
    resolved = {k: v for k, v in reach.items() if v != "not enough seeds"}
    verdict = ("not resolved (not enough seeds)" if not resolved else
               "holds for " + ", ".join(k for k, v in resolved.items() if v != "lower")
               if any(v != "lower" for v in resolved.values())
               else "does not hold: every soft setting falls short of bp")
    lines = ["1. **Accuracy of bp.** Soft settings against bp (95 % Welch interval of the "
             "difference): " + "; ".join(f"{k}: {v}" for k, v in reach.items())
             + f". Claim {verdict}."]
    flow = {k: _better(_column(v, "flow"), _column(fa, "flow")) for k, v in soft.items()}
    eig = {k: _better(_column(v, "top_eigenvalue"), _column(fa, "top_eigenvalue"), False)
           for k, v in soft.items()}
    lines.append("2. **Gradient flow and flatness.** Error norm at the first hidden layer "
                 "relative to the output, against FA's: " + "; ".join(
                     f"{k}: {v}" for k, v in flow.items()) + f" (bp: "
                 f"{_cell(_column(bp, 'flow'), digits=3)}, FA: {_cell(_column(fa, 'flow'), digits=3)})."
                 " Top Hessian eigenvalue against FA's: " + "; ".join(
                     f"{k}: {v}" for k, v in eig.items()) + ".")
    noise = {k: _better(_column(v, "noise_relative"), _column(fa, "noise_relative"))
             for k, v in soft.items()}
    general = {k: _better(acc[k], acc["fa"]) for k in soft}
    lines.append("3. **Generalisation and robustness.** Test accuracy against FA's: " + "; ".join(
        f"{k}: {v}" for k, v in general.items()) + f". Accuracy under noise {SIGMA} relative to "
        "clean, against FA's: " + "; ".join(f"{k}: {v}" for k, v in noise.items()) + ".")
    moderate = [k for k in MODERATE if k in soft and _column(soft[k], "own_rel")]
    if not moderate or not _column(bp, "own_rel"):
        lines.append("4. **Adversarial robustness over bp.** Not measured yet (attacks.json).")
        return lines
    own = {k: _better(_column(soft[k], "own_rel"), _column(bp, "own_rel")) for k in moderate}
    transfer = {k: _better(_column(soft[k], "transfer_rel"), _column(bp, "transfer_rel"))
                for k in moderate}
    holds = [k for k in moderate if own[k] == "higher" and transfer[k] == "higher"]
    masked = [k for k in moderate if own[k] == "higher" and transfer[k] != "higher"]
    lines.append(f"4. **Adversarial robustness over bp** (PGD {EPSILON}, accuracy relative to "
                 "clean). Own gradients, against bp: " + "; ".join(
                     f"{k}: {v}" for k, v in own.items()) + ". Transfer from another bp seed, "
                 "against bp's: " + "; ".join(f"{k}: {v}" for k, v in transfer.items()) + ". "
                 + (f"Holds for {', '.join(holds)}." if holds else "Holds for no setting.")
                 + (f" A gain under the own attack only (gradient masking, not robustness): "
                    f"{', '.join(masked)}." if masked else "") + " " + _masking(settings))
    return lines


def _masking(settings: dict[str, list[dict]]) -> str:
    """The usual sign of masked gradients: a transfer attack stronger than the white-box one."""
    attacked = [k for k, v in settings.items() if _column(v, "own_rel")]
    stronger = [k for k in attacked if _better(_column(settings[k], "transfer_rel"),
                                               _column(settings[k], "own_rel")) == "lower"]
    return ("The transfer attack is stronger than the own-gradient one (a sign of masked "
            "gradients) for: " + ", ".join(stronger) + "." if stronger else
            "The own-gradient attack is at least as strong as the transfer attack for every "
            "setting: no sign of masked gradients by this test.")


def _errorbars(plot, settings, key, scale=1.0):
    names = list(settings)
    points = [interval([scale * v for v in _column(settings[n], key)]) for n in names]
    plot.errorbar(range(len(names)), [p[0] for p in points], yerr=[p[1] for p in points],
                  fmt="o", capsize=3)
    plot.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    plot.grid(alpha=0.3)


def figures(settings: dict[str, list[dict]]) -> dict[str, Figure]:
    """One figure per claim."""
    out = {}
    figure = Figure(figsize=(6, 3.8))
    plot = figure.subplots()
    _errorbars(plot, settings, "accuracy", 100)
    plot.set_ylabel("final test accuracy (%), 95 % CI")
    figure.tight_layout()
    out["accuracy"] = figure
    figure = Figure(figsize=(12, 3.8))
    left, middle, right = figure.subplots(1, 3)
    for name, members in settings.items():
        profile = [statistics.fmean(p) for p in zip(*(m["depth_profile"] for m in members))]
        left.plot(range(len(profile)), profile, marker=".", label=name)
    left.set_yscale("log")
    left.set_xlabel("hidden layer")
    left.set_ylabel("error norm / output's")
    left.legend(fontsize=6)
    left.grid(alpha=0.3)
    _errorbars(middle, settings, "top_eigenvalue")
    middle.set_ylabel("top Hessian eigenvalue")
    _errorbars(right, settings, "trace")
    right.set_ylabel("Hessian trace")
    figure.tight_layout()
    out["flow_flatness"] = figure
    figure = Figure(figsize=(6, 3.8))
    plot = figure.subplots()
    _errorbars(plot, settings, "noise_relative")
    plot.set_ylabel(f"accuracy under noise {SIGMA} / clean")
    figure.tight_layout()
    out["noise"] = figure
    attacked = {k: v for k, v in settings.items() if _column(v, "own")}
    if attacked:
        figure = Figure(figsize=(10, 3.8))
        for plot, key, title in zip(figure.subplots(1, 2), ("own", "transfer"),
                                    ("own-gradient PGD", "transfer PGD from another bp seed")):
            for name, members in attacked.items():
                curve = [m[key] for m in members if key in m]
                eps = next(m["epsilons"] for m in members if "epsilons" in m)
                plot.plot(eps, [statistics.fmean(c) for c in zip(*curve)], marker="o", label=name)
            plot.set_xscale("log")
            plot.set_xlabel("epsilon (pixel units)")
            plot.set_ylabel("robust accuracy / clean")
            plot.set_title(title, fontsize=9)
            plot.grid(alpha=0.3)
        plot.legend(fontsize=6)
        figure.tight_layout()
        out["adversarial"] = figure
    return out


def convergence(runs: list[dict], last: int = 4) -> str:
    """How much bp's test accuracy still changed over its last ``last`` epochs."""
    changes = [100 * (r["records"][-1]["test_accuracy"] - r["records"][-1 - last]["test_accuracy"])
               for r in runs if r["state"] == "done" and r["labels"]["feedback"] == "bp"
               and len(r["records"]) > last]
    if not changes:
        return "bp's convergence: no finished bp run."
    return (f"bp's convergence: its test accuracy changed by {_cell(changes, digits=2)} points "
            f"over its last {last} epochs ({len(changes)} seeds).")


def _divergence(failed: dict[str, list[str]]) -> str:
    if not failed:
        return "No run diverged."
    return ("Diverged, left out of every mean and interval (non-finite: stopped by the training "
            "loop; a final loss: finite, but above the first epoch's): " + "; ".join(
                f"{k}: {len(v)} ({', '.join(v)})" for k, v in failed.items()) + ".")


def section(name: str, runs: list[dict], exp_dir: pathlib.Path, folder: pathlib.Path,
            page: pathlib.Path) -> list[str]:
    """The claims' table, verdicts and figures (lines of RESULTS.md)."""
    settings = by_setting(runs, exp_dir)
    if not settings:
        return []
    steps = {m["pgd_steps"] for members in settings.values() for m in members if "pgd_steps" in m}
    lines = ["### The four claims", "",
             "Mean ± half-width of the 95 % t interval over seeds; differences with their 95 % "
             "Welch interval. Attacks (`python -m experiments.soft_alignment_attacks`) on the "
             f"first 1000 test images, PGD with {', '.join(map(str, sorted(steps))) or 'n/a'} "
             "steps (converged: twice the steps lower the accuracy by at most half a point at "
             "every radius); transfer: perturbations from another bp seed's true gradients. "
             "Criteria: `experiments/soft_alignment_claims.py`.", ""]
    failed = diverged(runs)
    lines += table(settings, failed) + ["", convergence(runs), "", _divergence(failed), ""]
    lines += verdicts(settings) + [""]
    folder.mkdir(parents=True, exist_ok=True)
    for key, figure in figures(settings).items():
        path = folder / f"{name}_claim_{key}.png"
        figure.savefig(path, dpi=90)
        lines += [f"![{name}: {key}]({path.relative_to(page.parent)})", ""]
    return lines
