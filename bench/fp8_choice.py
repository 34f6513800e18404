"""From ``bench.fp8_gemm``'s timings to the engine's settings: which path wins at each row count,
the ``ROUTES`` table of :mod:`model.fast.fp8_gemm` that follows, and the split-K ``PRETUNED``
table of :mod:`model.fast.fp8_tuning`. Pure functions over the sweep's rows (dicts), so the
CPU tests cover them.

A row: ``shape`` (qkv, o, gate_up, down), ``n``, ``k``, ``m``, ``path`` (bf16, gemv, dot,
splitk_bf16, splitk_f16, splitk_fp8, scaled_mm, dequantize), ``config`` (the split-K fields or
None), ``us`` (None when it failed), ``err`` (against the product of the widened weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from model.fast.fp8_gemm import UNLIMITED, uses_bf16_twin
from model.fast.fp8_splitk import block_m_for

# The largest error a path may show and still count (the rows' E4M3 rounding for the FP8
# x FP8 paths, bf16 output rounding for the others).
TOLERANCE = {"splitk_fp8": 0.15, "scaled_mm": 0.15}
EXACT_TOLERANCE = 0.02
# Paths that change the numerics (E4M3 rows) and need bench.fp8_agreement's word first.
FP8_ROWS = frozenset({"splitk_fp8", "scaled_mm"})
FP8_PATHS = ("gemv", "dot", "splitk_bf16", "splitk_f16", "splitk_fp8", "scaled_mm", "dequantize")

Row = dict[str, Any]


def valid(row: Row) -> bool:
    """It ran and its error is within its path's tolerance."""
    if row.get("us") is None or row.get("err") is None:
        return False
    return bool(row["err"] <= TOLERANCE.get(row["path"], EXACT_TOLERANCE))


def best_rows(rows: Iterable[Row]) -> dict[tuple[str, int, str], Row]:
    """The fastest valid row per (shape, m, path)."""
    best: dict[tuple[str, int, str], Row] = {}
    for row in rows:
        if not valid(row):
            continue
        key = (row["shape"], row["m"], row["path"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    return best


def totals(
    best: dict[tuple[str, int, str], Row], shapes: Sequence[str], m: int
) -> dict[str, float]:
    """Per path, the microseconds of one layer's GEMMs (each shape once) at ``m`` rows, for the
    paths measured on every shape."""
    out = {}
    for path in dict.fromkeys(p for (_, mm, p) in best if mm == m):
        times = [best.get((shape, m, path)) for shape in shapes]
        if all(t is not None for t in times):
            out[path] = sum(float(t["us"]) for t in times if t is not None)
    return out


def winner(layer_us: dict[str, float], *, twin: bool, fp8_rows: bool) -> str | None:
    """The fastest path of ``layer_us`` a policy allows: the bf16 twin only with ``twin``,
    the E4M3-rows paths only with ``fp8_rows``."""
    allowed = {
        path: us
        for path, us in layer_us.items()
        if (path != "bf16" or twin)
        and (path not in FP8_ROWS or fp8_rows)
        and (path == "bf16" or path in FP8_PATHS)
    }
    return min(allowed, key=lambda path: allowed[path]) if allowed else None


def routes_from(winners: Sequence[tuple[int, str | None]]) -> tuple[tuple[int, str], ...]:
    """A routing table from the winning path at each measured row count (increasing): runs of
    one path merge, each ending at its largest row count, the last one UNLIMITED. Row counts
    between two measured ones take the next one's path; one row keeps the GEMV's own entry
    when it wins."""
    runs: list[list[Any]] = []
    for m, path in winners:
        if path is None:
            continue
        if path == "gemv" and m != 1:
            path = "dot"
        if runs and runs[-1][1] == path and path != "gemv":
            runs[-1][0] = m
        else:
            runs.append([m, path])
    if not runs:
        return ()
    runs[-1][0] = UNLIMITED
    return tuple((int(limit), str(path)) for limit, path in runs)


POLICIES = {
    "exact, no twin": {"twin": False, "fp8_rows": False},
    "exact, twin allowed": {"twin": True, "fp8_rows": False},
    "E4M3 rows, no twin": {"twin": False, "fp8_rows": True},
    "E4M3 rows, twin allowed": {"twin": True, "fp8_rows": True},
}


def choose(rows: Sequence[Row], shapes: Sequence[str], ms: Sequence[int]) -> dict[str, Any]:
    """Per policy of :data:`POLICIES`: the winner and the layer's microseconds at each row
    count, the step relative to bf16, and the ROUTES table that follows."""
    best = best_rows(rows)
    per_m = {m: totals(best, shapes, m) for m in sorted(ms)}
    result: dict[str, Any] = {"per_m": per_m, "policies": {}}
    for name, options in POLICIES.items():
        winners = [(m, winner(per_m[m], **options)) for m in sorted(ms)]
        speedups = {
            m: per_m[m]["bf16"] / per_m[m][path]
            for m, path in winners
            if path is not None and "bf16" in per_m[m]
        }
        result["policies"][name] = {
            "winners": winners,
            "vs_bf16": speedups,
            "routes": routes_from(winners),
        }
    return result


def pretuned(rows: Sequence[Row], block_m_of: Any) -> dict[tuple[str, int, int, int], Row]:
    """Per (mode, n, k, block_m): the split-K row whose configuration has the lowest summed
    time over the row counts of that row tile (only configurations valid at all of them)."""
    sums: dict[tuple[str, int, int, int, str], list[Any]] = {}
    counts: dict[tuple[str, int, int, int], set[int]] = {}
    for row in rows:
        if not row["path"].startswith("splitk_") or row.get("config") is None:
            continue
        mode = row["path"].removeprefix("splitk_")
        key = (mode, row["n"], row["k"], block_m_of(row["m"]))
        counts.setdefault(key, set()).add(row["m"])
        entry = sums.setdefault((*key, row["label"]), [0.0, set(), row])
        if valid(row):
            entry[0] += float(row["us"])
            entry[1].add(row["m"])
    chosen: dict[tuple[str, int, int, int], Row] = {}
    best_sum: dict[tuple[str, int, int, int], float] = {}
    for (*key_parts, _label), (total, seen, row) in sums.items():
        mode, n, k, block_m = key_parts
        key = (str(mode), int(str(n)), int(str(k)), int(str(block_m)))
        if seen != counts[key]:
            continue
        if key not in best_sum or total < best_sum[key]:
            best_sum[key], chosen[key] = total, row
    return chosen


def routes_literal(routes: tuple[tuple[int, str], ...]) -> str:
    body = ", ".join(
        f"({'UNLIMITED' if limit == UNLIMITED else limit}, {path!r})" for limit, path in routes
    )
    return f"ROUTES = ({body},)"


def pretuned_literal(chosen: dict[tuple[str, int, int, int], Row]) -> str:
    lines = ["PRETUNED = {"]
    for key in sorted(chosen):
        c = chosen[key]["config"]
        lines.append(
            f"    {key!r}: SplitKConfig({c['block_m']}, {c['block_n']}, {c['block_k']}, "
            f"{c['split_k']}, {c['num_warps']}, {c['num_stages']}),"
        )
    lines.append("}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; every row must have as many cells as ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header {len(header)}: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


REPORTED_PATHS = ("bf16", "gemv", "dot", "splitk_bf16", "splitk_f16", "splitk_fp8", "scaled_mm",
                  "dequantize")  # fmt: skip


def shape_table(rows: Sequence[Row], shape: str) -> str:
    """Per M: each path's best time (us), GB/s and error, and its best split-K config."""
    best = best_rows(r for r in rows if r["shape"] == shape)
    ms = sorted({m for (_, m, _) in best})
    paths = [p for p in REPORTED_PATHS if any(k[2] == p for k in best)]
    header = ["M", *(f"{p} us" for p in paths), "best FP8", "vs bf16", "GB/s", "err", "config"]
    cells = []
    for m in ms:
        here = {p: best[(shape, m, p)] for p in paths if (shape, m, p) in best}
        fp8_here = {p: r for p, r in here.items() if p != "bf16"}
        line = [str(m), *(f"{here[p]['us']:.1f}" if p in here else "-" for p in paths)]
        if fp8_here:
            top = min(fp8_here.values(), key=lambda r: r["us"])
            ratio = f"{here['bf16']['us'] / top['us']:.2f}x" if "bf16" in here else "-"
            line += [top["path"], ratio, f"{top['gbps']:.0f}", f"{top['err']:.4f}", top["label"]]
        else:
            line += ["-"] * 5
        cells.append(line)
    return markdown_table(header, cells)


def totals_table(choice: dict[str, Any]) -> str:
    """One layer's four GEMMs per M and path (us), and each policy's winner."""
    per_m = choice["per_m"]
    paths = [p for p in REPORTED_PATHS if any(p in t for t in per_m.values())]
    policies = list(choice["policies"])
    header = ["M", *(f"{p} us" for p in paths), *policies]
    cells = []
    for m, layer in per_m.items():
        line = [str(m), *(f"{layer[p]:.1f}" if p in layer else "-" for p in paths)]
        for name in policies:
            policy = choice["policies"][name]
            path = dict(policy["winners"]).get(m)
            ratio = policy["vs_bf16"].get(m)
            line.append(f"{path} {ratio:.2f}x" if path and ratio else (path or "-"))
        cells.append(line)
    return markdown_table(header, cells)


def report(
    rows: Sequence[Row], shapes: Sequence[tuple[str, str]], ms: Sequence[int]
) -> tuple[str, dict[str, Any]]:
    """The markdown report (per shape, per M, the ROUTES per policy, PRETUNED) and its data.
    ``shapes``: (name, label) pairs."""
    choice = choose(rows, [name for name, _ in shapes], ms)
    chosen = pretuned(rows, block_m_for)
    parts = []
    for name, label in shapes:
        parts += [f"\n## {label}\n", shape_table(rows, name)]
    parts += ["\n## one layer (qkv + o + gate_up + down), us, and the winners\n"]
    parts += [totals_table(choice)]
    parts += ["\n## ROUTES (model/fast/fp8_gemm.py) per policy\n"]
    for name, policy in choice["policies"].items():
        twin = "keeps" if uses_bf16_twin(policy["routes"] or None) else "drops"
        parts.append(f"- {name} ({twin} the bf16 twin): `{routes_literal(policy['routes'])}`")
    parts += ["\n## PRETUNED (model/fast/fp8_tuning.py)\n", "```python",
              pretuned_literal(chosen), "```"]  # fmt: skip
    failed = [r for r in rows if r.get("us") is None]
    if failed:
        parts.append(f"\n{len(failed)} measurements failed; first: {failed[0].get('error')}")
    summary = {
        "per_m": {str(m): t for m, t in choice["per_m"].items()},
        "policies": {
            name: {"routes": p["routes"], "winners": p["winners"], "vs_bf16": p["vs_bf16"]}
            for name, p in choice["policies"].items()
        },
        "pretuned": [{"key": list(k), "config": r["config"]} for k, r in sorted(chosen.items())],
    }
    return "\n".join(parts), summary
