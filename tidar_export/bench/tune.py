"""`tidar-export tune`: pick the block size and proposal set with the highest measured tokens/s.

    tidar-export tune ARTIFACT_DIR --checkpoint CKPT [--block-sizes 2-16] [--sparse 16:1,4,7,10,16 ...]
                      [--workdir DIR] [--dry-run] [--json OUT] [--markdown OUT] [--plot OUT.png]

For every candidate (each dense block size of --block-sizes, and each --sparse set) that fits
the artifact's KV cache with the prompts (longest prompt + --max-new-tokens + step width <=
max_seq_len), tune exports the candidate from the checkpoint (tidar_export.export.variants: same
target, precision, cache and batch as the artifact) and measures it exactly as `bench` does:
alternating AR / TiDAR decodes of the same prompts, `--repeats` times, plus the latency of its
step and ar_step (round-robin). The AR graph is the same in every candidate, so ranking by the
median per-repeat speedup over the interleaved AR decode ranks by tokens/s while cancelling
load drift between candidates measured minutes apart. A candidate whose output differs from
the artifact's own AR decode is disqualified (a wrong checkpoint or a bug, never a choice).

The choice is written into the artifact: unless --dry-run, the artifact directory is replaced
(temp copy beside it, then rename) by the winning candidate's artifact, whose manifest records
the measurement under `tuning` (runtime/manifest.py). The runtime reads block_size and
proposals from the manifest as before, so every runtime decodes with the tuned setting.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tidar_export.bench import measure as B
from tidar_export.bench.report import proposal_text
from tidar_export.errors import TiDARError
from tidar_runtime import fileio
from tidar_runtime.contract import step_len


def candidates(block_sizes, sparse, max_seq_len: int, need: int) -> tuple[list, list]:
    """[(b, proposals)] that fit, and the skipped ones with their reason.

    need: longest prompt + new tokens; a candidate fits when need + its width <= max_seq_len.
    """
    out, skipped, seen = [], [], set()
    wanted = [(b, tuple(range(1, b + 1))) for b in block_sizes] + list(B.parse_sparse(sparse))
    for b, rs in wanted:
        if b < 2:
            raise TiDARError(f"block size {b}: TiDAR needs b >= 2 (b = 1 is AR)")
        if (b, rs) in seen:
            continue
        seen.add((b, rs))
        w = step_len(b, rs)
        if need + w > max_seq_len:
            skipped.append({"block_size": b, "proposals": list(rs), "width": w,
                            "reason": f"prompt + new tokens {need} + width {w} > max_seq_len {max_seq_len}"})
        else:
            out.append((b, rs))
    return out, skipped


def tune(artifact, checkpoint, backend_name: str = "ort", threads: int = 1, prompts_file=None,
         num_prompts: int = B.DEFAULT_NUM_PROMPTS, prompt_len: int = B.DEFAULT_PROMPT_LEN,
         max_new: int = B.DEFAULT_MAX_NEW, repeats: int = B.DEFAULT_REPEATS, block_sizes=tuple(range(2, 17)),
         sparse=B.DEFAULT_SPARSE, workdir=None, cost_iters: int = B.DEFAULT_COST_ITERS, write: bool = True,
         force: bool = False) -> dict:
    from tidar_runtime import generate_ar_batch
    from tidar_runtime.manifest import load_manifest

    from tidar_export.export.variants import Variants

    artifact = Path(artifact)
    m = load_manifest(artifact)
    if write:  # before minutes of measuring: the artifact is ours to replace, and its folder writable
        artifact = fileio.prepare_output(artifact, "artifact", force)
    tok = B.artifact_tokenizer(artifact, m)
    vocab = m.vocab_size
    if prompts_file:
        prompts, source = B.load_prompts(prompts_file, tok, vocab), "file"
    else:
        prompts, source = B.default_prompts(tok, vocab, m.mask_token_id, num_prompts, prompt_len, max_new)
    need = max(len(p) for p in prompts) + max_new
    if m.block_size >= 2:  # the artifact's own setting is always a candidate (no export needed)
        sparse = list(sparse) + [f"{m.block_size}:{','.join(str(r) for r in m.proposals)}"]
    cands, skipped = candidates(block_sizes, sparse, m.max_seq_len, need)
    if not cands:
        raise TiDARError(f"no candidate fits max_seq_len {m.max_seq_len} with prompts of up to "
                         f"{max(len(p) for p in prompts)} tokens + {max_new} new tokens")
    t0 = time.perf_counter()
    base = B.open_bench_backend(backend_name, artifact, threads, checkpoint)
    reference = [r.tokens for r in (generate_ar_batch(base, [p], max_new)[0] for p in prompts)]
    del base
    variants = Variants(checkpoint, m, workdir)
    B.log(f"tune {artifact.name}: {len(cands)} candidates ({len(skipped)} skipped), {len(prompts)} prompts x "
          f"{max_new} tokens, {repeats} repeats, backend {backend_name}, {threads or 'default'} thread(s)")
    typical_L = int(np.mean([len(p) for p in prompts]) + max_new // 2)
    rows = []
    try:
        for n, (b, rs) in enumerate(cands, 1):
            own = (b, rs) == (m.block_size, tuple(m.proposals))
            vdir = artifact if own else variants.get(b, rs, progress=B.log)
            be = B.open_bench_backend(backend_name, vdir, threads, checkpoint)
            B.log(f"[{n}/{len(cands)}] b={b} proposals {proposal_text(rs, b)} (width {step_len(b, rs)})")
            dec = B.measure_decode(be, prompts, max_new, repeats, reference=reference)
            cost = B.time_steps(
                [({"kind": "ar_step"}, be, "ar_step"), ({"kind": "step"}, be, "step")], cost_iters,
                lambda bk, kind: max(0, min(typical_L, bk.max_len - (1 if kind == "ar_step" else
                                                                      step_len(bk.block_size, bk.proposals)))))
            ar_ms, step_ms = cost[0]["ms_p50"], cost[1]["ms_p50"]
            tpf = dec["tidar"]["tokens_per_forward"]
            row = {
                "block_size": b, "proposals": list(rs), "dense": rs == tuple(range(1, b + 1)),
                "width": step_len(b, rs), "source": "artifact" if own else "variant",
                "tokens_per_forward": tpf,
                "tidar_tokens_per_s": dec["tidar"]["tokens_per_s"], "ar_tokens_per_s": dec["ar"]["tokens_per_s"],
                "speedup": dec["speedup"],
                "accepted_histogram": dec["tidar"]["accepted_histogram"],
                "equal_to_ar": dec["equal_to_ar"],
                "step_ms": step_ms, "ar_step_ms": ar_ms, "cost_ratio": round(step_ms / ar_ms, 3),
                "projected_speedup": round(tpf * ar_ms / step_ms, 4),
                "conversion_ratio": round(dec["speedup"]["median"] / tpf, 4),
            }
            rows.append(row)
            B.log(f"    T/NFE {tpf:.2f}, speedup {row['speedup']['median']:.2f}x "
                  f"(projected {row['projected_speedup']:.2f}x), step {step_ms:.2f} ms vs AR {ar_ms:.3f} ms"
                  + ("" if row["equal_to_ar"] else "  OUTPUT DIFFERS FROM AR: disqualified"))
        valid = [r for r in rows if r["equal_to_ar"]]
        if not valid:
            raise TiDARError("every candidate's TiDAR output differed from the artifact's AR output: "
                             "is --checkpoint the artifact's checkpoint?")
        best = max(valid, key=lambda r: (r["speedup"]["median"], -r["width"]))
        ar_all = B.spread(r["ar_tokens_per_s"]["median"] for r in rows)  # drift over the sweep
        choice = {
            "block_size": best["block_size"], "proposals": best["proposals"], "width": best["width"],
            "speedup": best["speedup"]["median"], "tokens_per_forward": best["tokens_per_forward"],
            "tidar_tokens_per_s": best["tidar_tokens_per_s"]["median"],
            "ar_tokens_per_s": best["ar_tokens_per_s"]["median"],
            # "ar": no candidate beat AR here; decode AR on this device (`tidar-export demo` says so)
            "mode": "tidar" if best["speedup"]["median"] >= 1 else "ar",
        }
        if best["speedup"]["median"] < 1:
            B.log(f"note: TiDAR is slower than AR at every candidate on this device (best {best['speedup']['median']:.2f}x); "
                  "the fastest candidate is still written, and its figures are in the manifest's tuning record")
        report = {
            "artifact": artifact.name, "backend": backend_name, "threads": threads, "machine": B.machine(),
            "before": {"block_size": m.block_size, "proposals": list(m.proposals)},
            "prompts": {"source": source, "count": len(prompts),
                        "mean_len": round(float(np.mean([len(p) for p in prompts])), 1), "max_new_tokens": max_new},
            "repeats": repeats, "candidates": rows, "skipped": skipped,
            "ar_tokens_per_s_over_candidates": ar_all,
            "choice": choice, "written": False, "tune_s": None,
        }
        if write:
            chosen = artifact if (best["block_size"], tuple(best["proposals"])) == (m.block_size, tuple(m.proposals)) \
                else variants.get(best["block_size"], tuple(best["proposals"]))
            write_choice(artifact, chosen, tuning_record(report), force)
            report["written"] = True
    finally:
        variants.cleanup()
    report["tune_s"] = round(time.perf_counter() - t0, 1)
    return report


def tuning_record(report: dict) -> dict:
    """What the manifest's `tuning` field keeps: the choice, how it was measured, the sweep."""
    import tidar_export

    mc = report["machine"]
    return {
        "chosen": {k: report["choice"][k] for k in ("block_size", "proposals", "speedup", "tokens_per_forward",
                                                   "tidar_tokens_per_s", "ar_tokens_per_s", "mode")},
        "objective": "median per-repeat TiDAR/AR decode tokens/s (greedy, batch 1), AR interleaved",
        "backend": report["backend"], "threads": report["threads"],
        "device": f"{mc['cpu']}, {mc['cores']} cores",
        "prompts": report["prompts"], "repeats": report["repeats"],
        "candidates": [{"block_size": r["block_size"], "proposals": r["proposals"], "width": r["width"],
                        "tokens_per_forward": r["tokens_per_forward"], "speedup": r["speedup"]["median"]}
                       for r in report["candidates"]],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tidar_export": tidar_export.__version__,
    }


def write_choice(artifact: Path, chosen: Path, record: dict, force: bool = False) -> None:
    """Replace `artifact` by a copy of `chosen` whose manifest carries `record` (atomically)."""
    from tidar_runtime.manifest import load_manifest

    new = fileio.staging_dir(artifact)
    try:
        shutil.copytree(chosen, new, dirs_exist_ok=True)
        manifest = load_manifest(new)
        manifest.tuning = record
        manifest.save(new)
        load_manifest(new)  # the written manifest reads back
        fileio.publish_dir(new, artifact, "artifact", force)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
