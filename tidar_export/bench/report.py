"""Markdown tables and PNG plots of `bench` and `tune` reports."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_runtime.fileio import write_atomic


def _err(spreads):
    spreads = list(spreads)
    return [[s["median"] - s["min"] for s in spreads], [s["max"] - s["median"] for s in spreads]]


def fmt_spread(s: dict, digits: int = 1) -> str:
    if s.get("median") is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def proposal_text(proposals, b) -> str:
    if not proposals:
        return "-"
    if list(proposals) == list(range(1, b + 1)):
        return f"1..{b}"
    return ",".join(str(r) for r in proposals)


def markdown(r: dict) -> str:
    """Markdown tables of a bench report (what docs/BENCHMARKS.md shows)."""
    b = r["block_size"]
    mc = r["machine"]
    lines = [
        f"Artifact `{r['artifact']}`: b = {b}, proposals {proposal_text(r['proposals'], b)}, step width {r['step_width']}, "
        f"max_seq_len {r['max_seq_len']}, {r['precision']}, target {r['target']}; backend {r['backend']}, "
        f"{r['threads'] or 'default'} intra-op thread(s); {r['prompts']['count']} prompts "
        f"({r['prompts']['source']}, mean {r['prompts']['mean_len']} tokens) x {r['prompts']['max_new_tokens']} "
        f"new tokens, {r['repeats']} repeats; {mc['cpu']}, {mc['cores']} cores, load {mc.get('load_avg_1m')}.",
        "",
        "| mode | decode tokens/s, median [min, max] | end-to-end tokens/s | tokens/forward | prefill ms p50 / p99 | step ms p50 / p90 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, name in (("ar", "AR"), ("tidar", "TiDAR")):
        d = r[mode]
        lines.append(f"| {name} | {fmt_spread(d['tokens_per_s'])} | {fmt_spread(d['e2e_tokens_per_s'])} | "
                     f"{d['tokens_per_forward']:.2f} | {d['prefill_ms']['p50']} / {d['prefill_ms']['p99']} | "
                     f"{d['step_ms']['p50']} / {d['step_ms']['p90']} / {d['step_ms']['p99']} |")
    sp = r["speedup"]
    lines += [
        "",
        f"- TiDAR / AR tokens/s: **{sp['median']:.2f}x** median over {sp['n']} repeats "
        f"(min {sp['min']:.2f}, quartiles {sp['p25']:.2f} / {sp['p75']:.2f}, max {sp['max']:.2f})",
        f"- projected speedup (T/NFE x cost(1) / cost({r['step_width']})): {r['projected_speedup']:.2f}x; "
        f"conversion ratio (measured speedup / T/NFE): {r['conversion_ratio']:.2f}",
        f"- TiDAR output equal to AR: {'yes' if r['equal_to_ar'] else 'NO, prompts ' + str(r['mismatched_prompts'])}",
        f"- peak RSS (ru_maxrss, after the decode runs): {r['peak_rss_mib']} MiB",
        "",
        "Accepted length k per TiDAR step (first repeat, all prompts):",
        "",
    ]
    hist = r["tidar"]["accepted_histogram"]
    ks = sorted(hist, key=int)
    lines += ["| k | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
              "| steps | " + " | ".join(str(hist[k]) for k in ks) + " |", ""]
    lines += curve_markdown(r["step_cost"])
    return "\n".join(lines) + "\n"


def curve_markdown(cost: dict) -> list[str]:
    lines = [f"Step-cost curve (one forward; median of {cost['iters']} rounds x {cost.get('burst', 3)} calls, "
             "round-robin over the points, each call after one untimed call of the same graph):", "",
             "| b | proposals | width | ms p50 | ms min | cost / cost(1) |", "|---|---|---|---|---|---|"]
    for p in cost["points"]:
        lines.append(f"| {p['block_size'] if p['width'] > 1 else 'AR'} | {proposal_text(p['proposals'], p['block_size'])} | "
                     f"{p['width']} | {p['ms_p50']:.3f} | {p['ms_min']:.3f} | {p['cost_ratio']:.2f} |")
    for s in cost.get("skipped", []):
        lines.append(f"| {s['block_size']} | {proposal_text(s['proposals'], s['block_size'])} | {s['width']} | "
                     f"skipped: {s['reason']} | | |")
    return lines + [""]


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TiDARError("--plot needs matplotlib: pip install 'tidar-export[plot]'") from None


def plot(out: str | os.PathLike, curve: list[dict], sweep: list[dict] | None = None, title: str = "") -> Path:
    """PNG: the step-cost curve, and (with a tune sweep) tokens/s against block size."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    dense = [p for p in curve if p["width"] == 1 or p["proposals"] == list(range(1, p["block_size"] + 1))]
    sparse = [p for p in curve if p not in dense]
    ax.plot([p["width"] for p in dense], [p["ms_p50"] for p in dense], "o-", label="dense proposals (and AR, width 1)")
    for p in dense:
        if p["width"] > 1:
            ax.annotate(f"b={p['block_size']}", (p["width"], p["ms_p50"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    if sparse:
        ax.plot([p["width"] for p in sparse], [p["ms_p50"] for p in sparse], "s", label="sparse proposals")
        for i, p in enumerate(sparse):
            ax.annotate(f"b={p['block_size']} {{{proposal_text(p['proposals'], p['block_size'])}}}", (p["width"], p["ms_p50"]),
                        fontsize=7, textcoords="offset points", xytext=(-40 if i % 2 else 3, 4))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step width (tokens per forward pass, q_len)")
    ax.set_ylabel("latency of one forward (ms, median)")
    ax.set_title("step-cost curve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[0][1]
        dense_rows = sorted((s for s in sweep if s["dense"]), key=lambda s: s["block_size"])
        xs = [s["block_size"] for s in dense_rows]
        ax.errorbar(xs, [s["tidar_tokens_per_s"]["median"] for s in dense_rows],
                    yerr=_err(s["tidar_tokens_per_s"] for s in dense_rows), fmt="o-", capsize=3, label="TiDAR")
        ax.errorbar(xs, [s["ar_tokens_per_s"]["median"] for s in dense_rows],
                    yerr=_err(s["ar_tokens_per_s"] for s in dense_rows), fmt="x--", capsize=3, label="AR (interleaved)")
        for i, s in enumerate(s for s in sweep if not s["dense"]):
            ax.plot([s["block_size"]], [s["tidar_tokens_per_s"]["median"]], "s", color="C2")
            ax.annotate(f"{{{proposal_text(s['proposals'], s['block_size'])}}}", (s["block_size"], s["tidar_tokens_per_s"]["median"]),
                        fontsize=7, textcoords="offset points", xytext=(4, 4 if i % 2 else -10))
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block size b")
        ax.set_ylabel("decode tokens/s (median, bars: min..max)")
        ax.set_title("tokens/s vs block size (squares: sparse proposals)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(out, png.getvalue())


def tune_markdown(r: dict) -> str:
    mc = r["machine"]
    c = r["choice"]
    lines = [
        f"Tuned `{r['artifact']}` (was b = {r['before']['block_size']}, proposals "
        f"{proposal_text(r['before']['proposals'], r['before']['block_size'])}); backend {r['backend']}, "
        f"{r['threads'] or 'default'} intra-op thread(s); {r['prompts']['count']} prompts ({r['prompts']['source']}) "
        f"x {r['prompts']['max_new_tokens']} new tokens, {r['repeats']} repeats per candidate; {mc['cpu']}, "
        f"{mc['cores']} cores, load {mc.get('load_avg_1m')}.",
        "",
        "| b | proposals | width | T/NFE | TiDAR tokens/s | AR tokens/s (interleaved) | speedup median [min, max] "
        "| step ms / AR step ms | projected | conversion | equal to AR |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(r["candidates"], key=lambda x: (x["block_size"], x["width"])):
        mark = " **(chosen)**" if (row["block_size"], row["proposals"]) == (c["block_size"], c["proposals"]) else ""
        lines.append(
            f"| {row['block_size']}{mark} | {proposal_text(row['proposals'], row['block_size'])} | {row['width']} | "
            f"{row['tokens_per_forward']:.2f} | {fmt_spread(row['tidar_tokens_per_s'])} | {fmt_spread(row['ar_tokens_per_s'])} | "
            f"{fmt_spread(row['speedup'], 2)} | {row['step_ms']:.2f} / {row['ar_step_ms']:.3f} | "
            f"{row['projected_speedup']:.2f} | {row['conversion_ratio']:.2f} | {'yes' if row['equal_to_ar'] else 'NO'} |")
    for s in r["skipped"]:
        lines.append(f"| {s['block_size']} | {proposal_text(s['proposals'], s['block_size'])} | {s['width']} | "
                     f"skipped: {s['reason']} | | | | | | | |")
    lines += ["", f"Choice: b = {c['block_size']}, proposals {proposal_text(c['proposals'], c['block_size'])} (width "
              f"{c['width']}): {c['speedup']:.2f}x AR, {c['tidar_tokens_per_s']:.1f} vs {c['ar_tokens_per_s']:.1f} "
              f"tokens/s, T/NFE {c['tokens_per_forward']:.2f}; "
              + ("written into the artifact's manifest." if r["written"] else "not written (--dry-run).")
              + (" TiDAR is slower than AR at every candidate here: AR decoding is the faster choice on this "
                 "device for this model." if c["speedup"] < 1 else ""), ""]
    return "\n".join(lines) + "\n"


def curve_points(r: dict) -> list[dict]:
    """The step-cost curve of a tune sweep: width 1 (median AR step over candidates) and each step."""
    ar = float(np.median([row["ar_step_ms"] for row in r["candidates"]]))
    pts = [{"block_size": 1, "proposals": [], "width": 1, "ms_p50": ar}]
    pts += [{"block_size": row["block_size"], "proposals": row["proposals"], "width": row["width"],
             "ms_p50": row["step_ms"]} for row in r["candidates"]]
    return sorted(pts, key=lambda p: p["width"])
