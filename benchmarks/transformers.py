"""Step time and compiled memory of the registry's transformers under the rules, against backprop.

``vit`` (7x7 patches of 28x28x1 images, width 64, 2 blocks, 4 heads) at batch 128 and
``transformer_lm`` (width 64, 2 blocks, 4 heads, context 256, a 97-character vocabulary) at batch
32 x 256 tokens with the per-token loss (``pfa_jax.losses.next_token``): the jitted ``train_step``
time of each rule, interleaved with bp's (``common.interleaved_ms``), and its compiled memory
(``total = argument + output - alias + temp`` of ``memory_analysis()``, as ``memory.py``), both as
ratios to bp. PFA in its default form (``pfa_jax.rules.get('pfa')``). Targets: pfa, pfa_o, kp, fa
and usf <= 1.10 x bp in time; dfa <= 1.0 x bp; memory <= 1.05 x bp for every rule.

    .venv/bin/python benchmarks/transformers.py [--rules bp pfa ...] [--repeats 5] [--quick]
        [--json PATH]

``--quick``: batch 8 (and 8 x 32 tokens), 2 repeats.
"""
from __future__ import annotations

import jax
import optax
from common import interleaved_ms, machine, markdown_table, parser, report, verdict
from memory import analysis

import pfa_jax as pj

TIME_TARGETS = {"pfa": 1.10, "pfa_o": 1.10, "kp": 1.10, "fa": 1.10, "usf": 1.10, "dfa": 1.0}
MEMORY_TARGET = 1.05
VOCAB = 97


def _vit(rule, batch_size: int, length: int):
    del length
    images_key, labels_key = jax.random.split(jax.random.key(0))
    batch = {"image": jax.random.normal(images_key, (batch_size, 28, 28, 1)),
             "label": jax.random.randint(labels_key, (batch_size,), 0, 10)}
    return pj.models.get("vit", rule=rule, num_classes=10), batch, pj.losses.classification


def _lm(rule, batch_size: int, length: int):
    text = jax.random.randint(jax.random.key(0), (batch_size, length + 1), 0, VOCAB)
    batch = {"image": text[:, :-1], "label": text[:, 1:]}
    model = pj.models.get("transformer_lm", rule=rule, num_classes=VOCAB, context=length)
    return model, batch, pj.losses.next_token


MODELS = {"vit": _vit, "transformer_lm": _lm}


def state_and_batch(name: str, rule: str, batch_size: int, length: int):
    model, batch, loss = MODELS[name](rule, batch_size, length)
    state = pj.train.create_train_state(jax.random.key(0), model, batch,
                                        optax.sgd(0.01, momentum=0.9), loss=loss)
    return state, batch


def main(argv=None) -> None:
    p = parser(__doc__, repeats=5)
    p.add_argument("--rules", nargs="+", choices=pj.rules.names(),
                   default=["bp", "fa", "usf", "kp", "pfa", "pfa_o", "dfa"])
    args = p.parse_args(argv)
    info = machine()
    rules = list(dict.fromkeys(["bp", *args.rules]))
    repeats = 2 if args.quick else args.repeats
    sizes = {"vit": (8 if args.quick else 128, 0),
             "transformer_lm": (8, 32) if args.quick else (32, 256)}
    results, tables = {}, {}
    for name in MODELS:
        batch_size, length = sizes[name]
        built = {rule: state_and_batch(name, rule, batch_size, length) for rule in rules}
        step = jax.jit(pj.train.train_step)
        times = interleaved_ms({rule: (lambda s=s, b=b: step(s, b)) for rule, (s, b) in
                                built.items()}, repeats)
        memory = {rule: analysis(s, b, donate=False) for rule, (s, b) in built.items()}
        rows, entry = [], {}
        for rule in rules:
            time_ratio = times[rule]["median_ms"] / times["bp"]["median_ms"]
            mem = memory[rule]
            mem_ratio = (mem["total_bytes"] / memory["bp"]["total_bytes"]
                         if mem and memory["bp"] else None)
            entry[rule] = {"time_ms": times[rule], "time_ratio": time_ratio,
                           "memory": mem, "memory_ratio": mem_ratio,
                           "time_verdict": verdict(time_ratio, TIME_TARGETS.get(rule)),
                           "memory_verdict": verdict(mem_ratio, MEMORY_TARGET)
                           if mem_ratio is not None else "n/a"}
            rows.append([rule, f"{times[rule]['median_ms']:.1f}", f"{time_ratio:.2f}",
                         TIME_TARGETS.get(rule, "-"), entry[rule]["time_verdict"],
                         "n/a" if mem_ratio is None else f"{mem_ratio:.2f}",
                         entry[rule]["memory_verdict"]])
        shape = f"batch {batch_size}" + (f" x {length} tokens" if length else "")
        results[name] = {"batch_size": batch_size, "length": length, "rules": entry}
        tables[f"{name}, {shape}"] = markdown_table(
            ["rule", "step (ms)", "time / bp", "target", "", "memory / bp", f"<= {MEMORY_TARGET}"],
            rows)
    report({"machine": info, "repeats": repeats, "results": results}, tables, args.json)


if __name__ == "__main__":
    main()
