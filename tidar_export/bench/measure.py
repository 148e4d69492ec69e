"""`tidar-export bench`: AR vs TiDAR decode speed of an artifact, and the step-cost curve.

    tidar-export bench ARTIFACT_DIR [--backend ort] [--threads 1] [--prompts FILE]
                       [--checkpoint CKPT [--workdir DIR]] [--json OUT] [--markdown OUT] [--plot OUT.png]

What one run measures (docs/BENCHMARKS.md has the definitions and measured figures):
1. Decode, batch 1, greedy, no stop token (every prompt decodes exactly --max-new-tokens): for
   each repeat and prompt, an AR decode and a TiDAR decode on the same backend, alternating which
   goes first, so that a load change on the machine hits both modes alike. Per repeat, tokens/s
   = decoded tokens / decode wall time (wall time of the whole decode call, loop included, minus
   the prefill pass; the prefill's token excluded; `e2e` includes both);
   the speedup is TiDAR / AR of the same repeat, reported as median and spread over repeats.
   Also: tokens per forward, the accepted-length histogram, prefill and step latency
   percentiles, whether TiDAR's tokens equal AR's, and the process's peak RSS.
2. The step-cost curve: the latency of one forward against its width (q_len): 1 (ar_step),
   the artifact's own step, and, with --checkpoint, step graphs of other block sizes and
   sparse proposal sets exported from that checkpoint into --workdir (tidar_export.export.variants).
   The points are timed round-robin for the same drift reason (see `time_steps`).
   projected speedup = tokens per forward x cost(1) / cost(width); conversion ratio = measured
   speedup / tokens per forward.

Prompts: `--prompts FILE` is either JSONL (name ends in .jsonl: one JSON value per line, a
string of text, {"text": ...} or {"ids": [...]}) or plain text, one prompt per line. Without
it: --num-prompts windows of --prompt-len tokens, evenly spaced over the held-out files of the
Python standard library (tidar_export.train.data, never seen in training), tokenized with the
artifact's tokenizer; an artifact without a tokenizer gets seeded random token ids.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_runtime.contract import normalize_proposals, step_len

DEFAULT_NUM_PROMPTS = 8
DEFAULT_PROMPT_LEN = 32
DEFAULT_MAX_NEW = 96
DEFAULT_REPEATS = 5
DEFAULT_COST_ITERS = 20
# b:proposals (docs/ALGORITHM.md section 8): narrow steps for devices whose step cost grows with width (CPUs),
# and the paper's kind of sparse sets for large b
DEFAULT_SPARSE = ("2:1", "3:1", "4:1", "4:1,2", "6:1,2", "8:1,2,4,8", "16:1,2,4,8,16", "16:1,4,7,10,16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str | os.PathLike, tokenizer, vocab_size: int) -> list[list[int]]:
    """Prompts of a file: JSONL (.jsonl) or plain text with one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise TiDARError(f"prompts file not found: {path}")
    prompts: list[list[int]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        value: object = line
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except ValueError as e:
                raise TiDARError(f"{path}:{n}: invalid JSON ({e})") from None
            if isinstance(value, dict):
                value = value.get("ids", value.get("text"))
        if isinstance(value, list) and all(isinstance(t, int) for t in value):
            ids = value
        elif isinstance(value, str):
            if tokenizer is None:
                raise TiDARError(f"{path}:{n}: a text prompt needs the artifact's tokenizer.json "
                                 "(give token ids as {\"ids\": [...]} in a .jsonl file)")
            ids = tokenizer.encode(value).ids
        else:
            raise TiDARError(f"{path}:{n}: expected a string, {{\"text\": ...}} or {{\"ids\": [...]}}")
        if not ids:
            raise TiDARError(f"{path}:{n}: empty prompt")
        if max(ids) >= vocab_size or min(ids) < 0:
            raise TiDARError(f"{path}:{n}: token id outside the vocabulary of {vocab_size}")
        prompts.append([int(t) for t in ids])
    if not prompts:
        raise TiDARError(f"{path}: no prompts")
    return prompts


def default_prompts(tokenizer, vocab_size: int, mask_token_id: int, num: int, prompt_len: int,
                    max_new: int, seed: int = 0) -> tuple[list[list[int]], str]:
    """Held-out stdlib windows (with a tokenizer) or seeded random ids; and their source name."""
    if num < 1 or prompt_len < 1:
        raise TiDARError("--num-prompts and --prompt-len must be >= 1")
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        allowed = np.setdiff1d(np.arange(vocab_size), [mask_token_id])
        return [rng.choice(allowed, prompt_len).tolist() for _ in range(num)], "random-ids"
    from tidar_export.train import data
    from tidar_export.train.evaluate import prompts_from

    split = data.find_corpus("stdlib")
    stream = data.token_stream(tokenizer, data.read_texts(split.heldout), None)
    return prompts_from(stream, num, prompt_len, max_new), "stdlib-heldout"


def artifact_tokenizer(artifact_dir: Path, manifest):
    name = (manifest.tokenizer or {}).get("file")
    if not name:
        return None
    from tidar_export.train import data

    return data.load_tokenizer(artifact_dir / name)


# --------------------------------------------------------------------------- statistics


def spread(values) -> dict:
    """Median and spread (min, quartiles, max) of a list of measurements."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return {"median": None, "min": None, "p25": None, "p75": None, "max": None, "n": 0}
    q = np.percentile(a, [0, 25, 50, 75, 100])
    r = lambda v: round(float(v), 4)  # noqa: E731
    return {"median": r(q[2]), "min": r(q[0]), "p25": r(q[1]), "p75": r(q[3]), "max": r(q[4]), "n": int(a.size)}


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def machine() -> dict:
    """What the numbers were measured on (no paths, no host names)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- measurement


def open_bench_backend(name: str, artifact_dir, threads: int, checkpoint=None):
    """A backend for measuring: ORT with `threads` intra-op threads; torch needs the checkpoint."""
    from tidar_runtime.backends.select import open_backend

    kwargs = {}
    if name == "ort":
        kwargs["intra_op_threads"] = threads
    if name == "torch":
        kwargs["checkpoint"] = checkpoint
    return open_backend(name, artifact_dir, **kwargs)


def check_fits(prompts, max_new: int, width: int, max_seq_len: int) -> None:
    need = max(len(p) for p in prompts) + max_new + width
    if need > max_seq_len:
        raise TiDARError(f"the longest prompt + --max-new-tokens {max_new} + step width {width} = {need} "
                         f"exceeds the KV cache of {max_seq_len} slots: use shorter prompts or fewer new tokens")


def measure_decode(backend, prompts, max_new: int, repeats: int, progress=None, reference=None) -> dict:
    """Alternating AR / TiDAR greedy decodes of every prompt, `repeats` times (see module doc).

    `reference`: expected tokens per prompt (e.g. another artifact's AR decode); a TiDAR output
    that differs from it counts as a mismatch too.
    """
    from tidar_runtime import generate_ar_batch, generate_tidar_batch
    from tidar_runtime.stats import rate

    run = {"ar": generate_ar_batch, "tidar": generate_tidar_batch}
    if repeats < 1:
        raise TiDARError("--repeats must be >= 1")
    for mode in ("ar", "tidar"):  # warm-up: session creation and first-run allocations
        run[mode](backend, [prompts[0]], min(max_new, 4))
    rates = {m: [] for m in run}
    e2e = {m: [] for m in run}
    prefill = {m: [] for m in run}
    steps = {m: [] for m in run}
    accepted: list[int] = []
    tokens: dict[str, dict[int, list[int]]] = {m: {} for m in run}
    for rep in range(repeats):
        dec_tokens, dec_s, tot_s = Counter(), Counter(), Counter()
        for i, prompt in enumerate(prompts):
            order = ("ar", "tidar") if (rep + i) % 2 == 0 else ("tidar", "ar")
            for mode in order:
                t0 = time.perf_counter()
                res = run[mode](backend, [prompt], max_new)[0]
                wall = time.perf_counter() - t0  # includes the loop's own work (verify, commit)
                st = res.stats
                dec_tokens[mode] += len(res.tokens) - 1  # the first token comes from the prefill
                dec_s[mode] += wall - st.prefill_s
                tot_s[mode] += wall
                prefill[mode].append(st.prefill_s)
                steps[mode] += st.step_s
                if mode == "tidar" and rep == 0:
                    accepted += st.accepted
                tokens[mode].setdefault(i, res.tokens)
                if tokens[mode][i] != res.tokens:
                    raise TiDARError(f"{mode} decode of prompt {i} is not deterministic across repeats")
        for mode in run:
            rates[mode].append(rate(dec_tokens[mode], dec_s[mode]) or 0.0)
            e2e[mode].append(rate(dec_tokens[mode] + len(prompts), tot_s[mode]) or 0.0)
        if progress:
            progress(f"repeat {rep + 1}/{repeats}: AR {rates['ar'][-1]:.1f} tok/s, "
                     f"TiDAR {rates['tidar'][-1]:.1f} tok/s")
    from tidar_runtime.stats import percentiles_ms

    mismatched = [i for i in range(len(prompts)) if tokens["ar"][i] != tokens["tidar"][i]
                  or (reference is not None and reference[i] != tokens["tidar"][i])]
    tpf = sum(accepted) / max(1, len(accepted))
    out = {}
    for mode in run:
        out[mode] = {
            "tokens_per_s": spread(rates[mode]),
            "e2e_tokens_per_s": spread(e2e[mode]),
            "tokens_per_forward": round(tpf, 4) if mode == "tidar" else 1.0,
            "prefill_ms": percentiles_ms(prefill[mode], (50, 99)),
            "step_ms": percentiles_ms(steps[mode], (50, 90, 99)),
            "forwards_per_repeat": len(steps[mode]) // repeats,
        }
    out["tidar"]["accepted_histogram"] = {str(k): v for k, v in sorted(Counter(accepted).items())}
    ratios = [t / a if a else 0.0 for t, a in zip(rates["tidar"], rates["ar"])]
    out["speedup"] = spread(ratios) | {"per_repeat": [round(r, 4) for r in ratios]}
    out["equal_to_ar"] = not mismatched
    out["mismatched_prompts"] = mismatched
    return out


def time_steps(points, rounds: int, cache_len_for, progress=None, burst: int = 3) -> list[dict]:
    """Latency of one forward of each point; point = (label dict, backend, kind).

    Timed in rounds: each round visits every point once and runs it 1 + `burst` times, timing
    only the last `burst` calls. Round-robin spreads a load change over all points alike; the
    untimed call first brings the point's weights back into the CPU caches, as in a decode loop
    (which runs one graph over and over), so narrow steps are not charged for cold caches.
    """
    inputs = {}
    for _, be, kind in points:
        width = 1 if kind == "ar_step" else be.block_size
        L = np.full(be.max_batch, cache_len_for(be, kind), dtype=np.int64)
        inputs[id(be), kind] = (np.full((be.max_batch, width), 2, dtype=np.int64), L)

    def call(be, kind):
        ids, L = inputs[id(be), kind]
        return be.ar_step(ids, L, False) if kind == "ar_step" else be.step(ids, L, False)

    for _, be, kind in points:  # warm-up: session creation, first-run allocations
        for _ in range(2):
            call(be, kind)
    times: list[list[float]] = [[] for _ in points]
    for it in range(rounds):
        for n, (_, be, kind) in enumerate(points):
            call(be, kind)
            for _ in range(burst):
                t0 = time.perf_counter()
                call(be, kind)
                times[n].append(time.perf_counter() - t0)
        if progress and (it + 1) % max(1, rounds // 4) == 0:
            progress(f"step cost: round {it + 1}/{rounds}")
    out = []
    for (label, be, kind), ts in zip(points, times):
        ms = np.asarray(ts) * 1e3
        out.append(label | {"cache_len": int(cache_len_for(be, kind)),
                            "ms_p50": round(float(np.median(ms)), 4), "ms_min": round(float(ms.min()), 4),
                            "ms_p90": round(float(np.percentile(ms, 90)), 4)})
    return out


def parse_sparse(specs) -> list[tuple[int, tuple[int, ...]]]:
    """["16:1,4,7,10,16", ...] -> [(16, (1, 4, 7, 10, 16)), ...]; proposals validated."""
    out = []
    for spec in specs:
        b, sep, rs = spec.partition(":")
        try:
            b_int, levels = int(b), [int(x) for x in rs.split(",") if x.strip()]
        except ValueError:
            raise TiDARError(f"sparse proposal set {spec!r}: expected B:R,R,... e.g. 16:1,4,7,10,16") from None
        if not sep or not levels:
            raise TiDARError(f"sparse proposal set {spec!r}: expected B:R,R,... e.g. 16:1,4,7,10,16")
        out.append((b_int, normalize_proposals(b_int, levels)))
    return out


def block_size_range(text: str) -> list[int]:
    """'2-16' or '2,4,8' -> a list of block sizes."""
    import argparse

    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 2-16 or a list like 2,4,8, got {text!r}") from None


def bench(artifact: str | os.PathLike, backend_name: str = "ort", threads: int = 1, prompts_file=None,
          num_prompts: int = DEFAULT_NUM_PROMPTS, prompt_len: int = DEFAULT_PROMPT_LEN,
          max_new: int = DEFAULT_MAX_NEW, repeats: int = DEFAULT_REPEATS, checkpoint=None, workdir=None,
          curve_block_sizes=tuple(range(2, 17)), sparse=DEFAULT_SPARSE, cost_iters: int = DEFAULT_COST_ITERS) -> dict:
    """The full benchmark report of one artifact (a JSON-ready dict)."""
    from tidar_runtime.manifest import load_manifest

    artifact = Path(artifact)
    m = load_manifest(artifact)
    tok = artifact_tokenizer(artifact, m)
    vocab = m.vocab_size
    if prompts_file:
        prompts, source = load_prompts(prompts_file, tok, vocab), "file"
    else:
        prompts, source = default_prompts(tok, vocab, m.mask_token_id, num_prompts, prompt_len, max_new)
    width = m.step_len
    check_fits(prompts, max_new, width, m.max_seq_len)
    t0 = time.perf_counter()
    backend = open_bench_backend(backend_name, artifact, threads, checkpoint)
    log(f"bench {artifact.name}: b={m.block_size}, width {width}, {len(prompts)} prompts x {max_new} tokens, "
        f"{repeats} repeats, backend {backend_name}, {threads or 'default'} thread(s)")
    decode = measure_decode(backend, prompts, max_new, repeats, log)
    rss = peak_rss_mib()
    typical_L = int(np.mean([len(p) for p in prompts]) + max_new // 2)

    def cache_len_for(be, kind):
        w = 1 if kind == "ar_step" else step_len(be.block_size, be.proposals)
        return max(0, min(typical_L, be.max_len - w))

    points = [({"block_size": 1, "proposals": [], "width": 1, "source": "artifact ar_step"}, backend, "ar_step"),
              ({"block_size": m.block_size, "proposals": list(m.proposals), "width": width,
                "source": "artifact step"}, backend, "step")]
    skipped = []
    variants = None
    if checkpoint is not None:
        from tidar_export.export.variants import Variants

        variants = Variants(checkpoint, m, workdir)
    try:
        wanted = [(b, None) for b in curve_block_sizes] + list(parse_sparse(sparse)) if variants else []
        for b, rs in wanted:
            rs = tuple(range(1, b + 1)) if rs is None else rs
            w = step_len(b, rs)
            if (b, tuple(rs)) == (m.block_size, tuple(m.proposals)):
                continue
            if w + 1 > m.max_seq_len:
                skipped.append({"block_size": b, "proposals": list(rs), "width": w,
                                "reason": f"width {w} + 1 > max_seq_len {m.max_seq_len}"})
                continue
            vdir = variants.get(b, rs, progress=log)
            points.append(({"block_size": b, "proposals": list(rs), "width": w, "source": "variant step"},
                           open_bench_backend(backend_name, vdir, threads, checkpoint), "step"))
        curve = time_steps(points, cost_iters, cache_len_for, log)
    finally:
        if variants is not None:
            variants.cleanup()  # removes a temp workdir only
    curve.sort(key=lambda p: (p["width"], p["block_size"]))
    cost1 = next(p["ms_p50"] for p in curve if p["width"] == 1)
    own = next(p for p in curve if p["source"] == "artifact step")
    for p in curve:
        p["cost_ratio"] = round(p["ms_p50"] / cost1, 3)
    tpf = decode["tidar"]["tokens_per_forward"]
    projected = tpf * cost1 / own["ms_p50"]
    return {
        "artifact": artifact.name,
        "backend": backend_name,
        "threads": threads,
        "machine": machine(),
        "versions": {"tidar_export": _version(), **{k: v for k, v in m.versions.items() if k in ("torch", "onnx")}},
        "model": {k: m.model_config().get(k) for k in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "num_kv_heads", "head_dim")},
        "block_size": m.block_size,
        "proposals": list(m.proposals),
        "step_width": width,
        "max_seq_len": m.max_seq_len,
        "precision": m.precision,
        "target": m.target,
        "prompts": {"source": source, "count": len(prompts), "mean_len": round(float(np.mean([len(p) for p in prompts])), 1),
                    "max_new_tokens": max_new},
        "repeats": repeats,
        "ar": decode["ar"],
        "tidar": decode["tidar"],
        "speedup": decode["speedup"],
        "tokens_per_forward": tpf,
        "equal_to_ar": decode["equal_to_ar"],
        "mismatched_prompts": decode["mismatched_prompts"],
        "projected_speedup": round(projected, 4),
        "conversion_ratio": round(decode["speedup"]["median"] / tpf, 4),
        "step_cost": {"iters": cost_iters, "burst": 3, "points": curve, "skipped": skipped},
        "peak_rss_mib": rss,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _version() -> str:
    import tidar_export

    return tidar_export.__version__


# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- CLI
