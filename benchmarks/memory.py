"""Peak memory of one compiled train step, every rule against backprop.

For ResNet-20, batch 128, 32x32x3 (default), the compiled executable's own memory analysis,
``jax.jit(pfa_jax.train.train_step).lower(state, batch).compile().memory_analysis()``: its
``argument``, ``output``, ``alias``, ``temp`` and ``generated_code`` sizes (bytes, as XLA reports
them for ``jax.devices()[0]``), and

    total = argument + output - alias + temp

(everything the step holds at once: inputs, outputs not aliased to inputs, and XLA's scratch, whose
size is the peak of its buffer assignment) and each rule's ratio of ``total`` to bp's; the same
with the state donated (``donate_argnums=0``, as ``train_epoch`` does, so the new state may reuse
the old one's buffers: ``alias`` > 0) is reported as ``donated``. The train
state's own size (parameters, feedback, optimizer state) is reported too. No timing, so no
interleaving. Target: ``pfa`` <= 1.2 x bp.

Prints JSON (also to ``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/memory.py [--models resnet20 ...] [--rules bp pfa ...]
        [--batch 128] [--quick] [--json PATH]

``--quick``: batch 8, rules bp, fa, pfa and dfa (unless ``--rules`` is given).
"""
from __future__ import annotations

import jax
from common import IMAGE_SHAPES, machine, markdown_table, parser, random_batch, report, train_state

import pfa_jax as pj

FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes",
          "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_alias_size_in_bytes",
          "host_temp_size_in_bytes")
TARGETS = {"pfa": 1.2}
MB = 2 ** 20


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def analysis(state, batch, donate: bool) -> dict | None:
    step = jax.jit(pj.train.train_step, donate_argnums=(0,) if donate else ())
    stats = step.lower(state, batch).compile().memory_analysis()
    if stats is None:
        return None
    fields = {f: int(getattr(stats, f)) for f in FIELDS if hasattr(stats, f)}
    fields["total_bytes"] = (fields["argument_size_in_bytes"] + fields["output_size_in_bytes"]
                             - fields["alias_size_in_bytes"] + fields["temp_size_in_bytes"])
    return fields


def measure(model_name: str, rule: str, batch_size: int) -> dict:
    batch = random_batch((batch_size,) + IMAGE_SHAPES[model_name])
    state = train_state(model_name, rule, batch)
    fields = analysis(state, batch, donate=False)
    if fields is None:
        return {"available": False}
    donated = analysis(state, batch, donate=True)
    return {"available": True, **fields,
            "donated": donated,
            "state_bytes": {"params": tree_bytes(state.params),
                            "feedback": tree_bytes(state.feedback),
                            "opt_state": tree_bytes(state.opt_state),
                            "batch_stats": tree_bytes(state.batch_stats)}}


def main(argv=None) -> None:
    p = parser(__doc__, repeats=1)
    p.add_argument("--models", nargs="+", default=["resnet20"], choices=list(IMAGE_SHAPES))
    p.add_argument("--rules", nargs="+", choices=pj.rules.names(), help="default: every rule")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    info = machine()
    default = ("bp", "fa", "pfa", "dfa") if args.quick else pj.rules.names()
    rules = list(dict.fromkeys(["bp", *(args.rules or default)]))
    batch_size = 8 if args.quick else args.batch
    results, tables = {}, {}
    for model_name in args.models:
        rows = {r: measure(model_name, r, batch_size) for r in rules}
        base = rows["bp"].get("total_bytes")
        for r, v in rows.items():
            if v["available"] and base:
                v["ratio_to_bp"] = round(v["total_bytes"] / base, 4)
                if v["donated"] and rows["bp"]["donated"]:
                    v["donated_ratio_to_bp"] = round(
                        v["donated"]["total_bytes"] / rows["bp"]["donated"]["total_bytes"], 4)
                v["target"] = TARGETS.get(r)
                v["verdict"] = ("pass" if v["ratio_to_bp"] <= TARGETS[r] else "FAIL") \
                    if r in TARGETS else ""
        results[model_name] = {"batch": batch_size, "rules": rows}
        tables[f"{model_name}, batch {batch_size}: train-step memory (MiB)"] = markdown_table(
            ["rule", "argument", "output", "temp", "total", "ratio to bp", "target", "verdict",
             "donated: alias", "donated: total", "donated: ratio", "state (params+feedback+opt)"],
            [[r, v["argument_size_in_bytes"] / MB, v["output_size_in_bytes"] / MB,
              v["temp_size_in_bytes"] / MB, v["total_bytes"] / MB, v.get("ratio_to_bp"),
              v.get("target") or "", v.get("verdict", ""),
              v["donated"]["alias_size_in_bytes"] / MB if v["donated"] else None,
              v["donated"]["total_bytes"] / MB if v["donated"] else None,
              v.get("donated_ratio_to_bp"), sum(v["state_bytes"].values()) / MB]
             if v["available"] else [r, "n/a"]
             for r, v in rows.items()])
    report({"benchmark": "memory", "machine": info,
            "config": {"batch": batch_size, "rules": rules, "quick": args.quick,
                       "total": "argument + output - alias + temp"},
            "results": results}, tables, args.json)


if __name__ == "__main__":
    main()
