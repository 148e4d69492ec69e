"""Where a decode step's time goes on ONNX Runtime CPU, per step width (docs/BENCHMARKS.md).

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --workdir DIR [--checkpoint CKPT]
        [--settings 2:1 4:1 4 8] [--cache-len 64] [--max-seq-len N] [--threads 1]
        [--iters 300] [--repeats 5] [--json OUT] [--markdown OUT]

For each TiDAR setting b:proposals (b alone: every proposal block) it exports an artifact of
CKPT (default: the embedded demo model) into DIR (once; `tidar-export export`), so that the
widths are the ar_step (1) and each setting's step (b + b * |proposals|: 2:1 -> 4, 4:1 -> 8,
4 -> 20, 8 -> 72). Then, per graph:
- the step time as the runtime sees it: OrtBackend.step / ar_step at cache length
  --cache-len (I/O binding, the K/V commit), median of --repeats rounds of --iters passes,
  every graph in turn in each round (--sequential: one graph at a time, for models too large
  to hold every artifact's session at once);
- ONNX Runtime's profiler over --iters passes: kernel time per op type, summed into MatMul
  (MatMul, FusedMatMul), attention (Attention, GroupQueryAttention) and the rest, with the
  node count, and the rest's time per node (the per-op overhead);
- the MatMul work: 2 * M * K * N per MatMul with a constant [K, N] weight (the ones ONNX
  Runtime prepacks: its profiler then records only the [.., M, K] activation), from the
  profiler's recorded shapes; the achieved MatMul rate = that work over the
  step time, and its ratio to the rate of one large fp32 MatMul (--big M,K,N, default
  512,2048,2048) in ONNX Runtime on the same thread count: the share of the step that is the
  arithmetic it must do.
With --max-seq-len 256,2048 the same checkpoint is exported with each cache size and the
steps are timed at the same cache length: the cost must not follow max_seq_len. (The
checkpoint's max_position_embeddings must allow the largest; the script raises it in a copy
of the checkpoint's config inside DIR when it does not, the weights linked, not copied.)

Nothing here is a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MATMUL_OPS = ("MatMul", "FusedMatMul", "MatMulNBits")
ATTENTION_OPS = ("Attention", "GroupQueryAttention", "MultiHeadAttention")


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def export(checkpoint: Path, out: Path, block: int, proposals: str | None, max_seq_len: int | None) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "tidar_export", "export", str(checkpoint), "-o", str(out), "--block-size", str(block)]
    if proposals:
        cmd += ["--proposals", proposals]
    if max_seq_len:
        cmd += ["--max-seq-len", str(max_seq_len)]
    print("$ tidar-export " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def checkpoint_with_context(checkpoint: Path, workdir: Path, max_seq_len: int) -> Path:
    """CKPT itself, or a copy of it whose config says max_position_embeddings >= max_seq_len (RoPE
    positions are computed, not stored; files are copied: the checkpoint reader refuses links)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    if cfg.get("max_position_embeddings", 0) >= max_seq_len:
        return checkpoint
    out = workdir / f"checkpoint_ctx{max_seq_len}"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in checkpoint.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copyfile(f, out / f.name)
        cfg["max_position_embeddings"] = max_seq_len
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def pass_of(backend, kind: str, cache_len: int):
    """One step / ar_step pass at cache length `cache_len`, as the decode loop calls it."""
    B = backend.max_batch
    L = np.full(B, cache_len, np.int64)
    if kind == "step":
        ids = np.full((B, backend.block_size), 5, np.int64)
        return lambda: backend.step(ids, L, False)
    ids = np.full((B, 1), 5, np.int64)
    return lambda: backend.ar_step(ids, L, False)


def time_passes(passes: list, iters: int, repeats: int) -> list[float]:
    """Median ms of each pass over `repeats` rounds; in every round each pass runs `iters` times,
    in turn, so that a change of load on a shared machine hits all of them alike."""
    for run in passes:
        for _ in range(max(3, iters // 5)):
            run()
    times: list[list[float]] = [[] for _ in passes]
    for r in range(repeats):
        order = list(range(len(passes)))
        order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
        for i in order:
            t0 = time.perf_counter()
            for _ in range(iters):
                passes[i]()
            times[i].append((time.perf_counter() - t0) / iters * 1e3)
    return [statistics.median(t) for t in times]


def profile_graph(artifact: Path, kind: str, cache_len: int, iters: int, threads: int) -> dict:
    """ONNX Runtime's profiler over `iters` passes (I/O binding as the backend binds them)."""
    from tidar_runtime.backends.ort import OrtBackend

    with tempfile.TemporaryDirectory() as tmp:
        backend = OrtBackend(artifact, intra_op_threads=threads)
        opts = backend._opts
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.log_severity_level = 3
        L = np.full(backend.max_batch, cache_len, np.int64)
        width = backend.block_size if kind == "step" else 1
        ids = np.full((backend.max_batch, width), 5, np.int64)
        call = backend.step if kind == "step" else backend.ar_step
        for _ in range(iters):
            call(ids, L, False)
        path = backend.session(kind).end_profiling()
        events = json.loads(Path(path).read_text())
        del backend, opts
    per_op: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    flops = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        per_op[op] += e["dur"]
        nodes[op].add(e["name"])
        if op in ("MatMul", "FusedMatMul"):
            # ORT lists only the activation of a MatMul whose constant weight it prepacked: that one
            # entry is [.., M, K], and the output [.., M, N]
            ins = [list(d.values())[0] for d in e["args"].get("input_type_shape", [])]
            outs = [list(d.values())[0] for d in e["args"].get("output_type_shape", [])]
            if len(ins) == 1 and outs:
                flops += 2.0 * float(np.prod(ins[0])) * outs[0][-1]
    us = {op: t / iters for op, t in per_op.items()}
    count = {op: len(v) for op, v in nodes.items()}
    total = sum(us.values())
    mm = sum(v for op, v in us.items() if op in MATMUL_OPS)
    att = sum(v for op, v in us.items() if op in ATTENTION_OPS)
    rest_nodes = sum(c for op, c in count.items() if op not in MATMUL_OPS + ATTENTION_OPS)
    return {"kernel_us": total, "matmul_us": mm, "attention_us": att, "other_us": total - mm - att,
            "nodes": sum(count.values()), "other_nodes": rest_nodes,
            "other_us_per_node": (total - mm - att) / max(1, rest_nodes),
            "matmul_flops": flops / iters, "per_op_us": dict(sorted(us.items(), key=lambda kv: -kv[1])),
            "per_op_nodes": count}


def big_matmul_rate(m: int, k: int, n: int, threads: int, repeats: int) -> float:
    """GFLOP/s of one [m, k] x [k, n] fp32 MatMul (constant weight) in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            sess.run(None, {"x": x})
        times.append((time.perf_counter() - t0) / 5)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def parse_setting(text: str) -> tuple[int, str | None]:
    b, _, props = text.partition(":")
    return int(b), props or None


def width_of(block: int, proposals: str | None) -> int:
    n = len(proposals.split(",")) if proposals else block
    return block + block * n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="folder for the exported artifacts")
    p.add_argument("--checkpoint", default=str(ROOT / "tidar_export" / "demo_model"))
    p.add_argument("--artifacts", nargs="+", metavar="DIR",
                   help="profile these artifacts (their ar_step and step) instead of exporting settings, "
                        "e.g. the same settings exported before and after a change")
    p.add_argument("--settings", nargs="+", default=["2:1", "4:1", "4", "8"],
                   help="TiDAR settings b[:proposals] (default: widths 4, 8, 20, 72)")
    p.add_argument("--cache-len", type=int, default=64)
    p.add_argument("--max-seq-len", help="comma-separated cache sizes to compare at --cache-len (e.g. 256,2048)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sequential", action="store_true",
                   help="time one graph at a time (default: all interleaved; a large model needs this)")
    p.add_argument("--big", default="512,2048,2048", help="M,K,N of the reference MatMul")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    try:
        import onnxruntime  # noqa: F401

        from tidar_runtime.backends.ort import OrtBackend
    except ImportError as e:
        return fail(f"needs tidar-export's runtime and onnxruntime ({e})")
    ckpt, work = Path(args.checkpoint), Path(args.workdir)
    if not (ckpt / "config.json").is_file():
        return fail(f"{ckpt}: not a checkpoint folder (no config.json)")
    work.mkdir(parents=True, exist_ok=True)
    name = ckpt.name
    sizes = [int(x) for x in args.max_seq_len.split(",")] if args.max_seq_len else [None]
    rows, todo = [], []
    for art in map(Path, args.artifacts or ()):
        m = json.loads((art / "manifest.json").read_text())
        todo += [(1, art, "ar_step", None), (width_of(m["block_size"], ",".join(map(str, m["proposals"]))), art, "step", None)]
    for size in sizes if not args.artifacts else ():
        src = checkpoint_with_context(ckpt, work, size) if size else ckpt
        suffix = f"_s{size}" if size else ""
        graphs = []  # (width, artifact, kind)
        for i, text in enumerate(args.settings):
            b, props = parse_setting(text)
            art = export(src, work / f"{name}_b{b}_{(props or 'all').replace(',', '-')}{suffix}", b, props, size)
            if i == 0:
                graphs.append((1, art, "ar_step"))
            graphs.append((width_of(b, props), art, "step"))
        todo += [(width, art, kind, size) for width, art, kind in graphs]
    if args.sequential:  # one backend alive at a time (large models)
        timed = []
        for width, art, kind, _ in todo:
            backend = OrtBackend(art, intra_op_threads=args.threads)
            timed += time_passes([pass_of(backend, kind, args.cache_len)], args.iters, args.repeats)
            del backend
    else:
        backends = [OrtBackend(art, intra_op_threads=args.threads) for _, art, _, _ in todo]
        timed = time_passes([pass_of(be, kind, args.cache_len) for be, (_, _, kind, _) in zip(backends, todo)],
                            args.iters, args.repeats)
        del backends
    for (width, art, kind, _), ms in zip(todo, timed):
        prof = profile_graph(art, kind, args.cache_len, args.iters, args.threads)
        S = json.loads((art / "manifest.json").read_text())["max_seq_len"]
        rows.append({"width": width, "graph": kind, "artifact": art.name, "max_seq_len": S, "step_ms": ms, **prof})
        print(f"width {width:3d} ({kind}, {art.name}, S={S}): {ms:.3f} ms, MatMul {prof['matmul_us']:.0f} us, "
              f"attention {prof['attention_us']:.0f} us, other {prof['other_us']:.0f} us over "
              f"{prof['other_nodes']} nodes", file=sys.stderr, flush=True)
    m, k, n = (int(x) for x in args.big.split(","))
    big = big_matmul_rate(m, k, n, args.threads, args.repeats)
    ar = next((r["step_ms"] for r in rows if r["width"] == 1), None)
    for r in rows:
        r["matmul_gflops"] = r["matmul_flops"] / (r["step_ms"] * 1e-3) / 1e9
        r["share_of_big_matmul"] = r["matmul_gflops"] / big
        ar_same = next((x["step_ms"] for x in rows if x["width"] == 1 and x["artifact"] == r["artifact"]),
                       next((x["step_ms"] for x in rows if x["width"] == 1 and x["max_seq_len"] == r["max_seq_len"]), ar))
        r["cost_vs_ar"] = r["step_ms"] / ar_same if ar_same else None
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
              "onnxruntime": onnxruntime.__version__, "checkpoint": name, "threads": args.threads,
              "cache_len": args.cache_len, "big_matmul": {"m": m, "k": k, "n": n, "gflops": big}, "rows": rows}
    md = [f"Checkpoint {name}, ONNX Runtime {onnxruntime.__version__} CPU, {args.threads} thread(s), cache length "
          f"{args.cache_len}; one {m}x{k}x{n} fp32 MatMul: {big:.1f} GFLOP/s. Load average at the end: "
          f"{os.getloadavg()[0]:.2f}.", "",
          "| width | graph | artifact | max_seq_len | step ms | cost / AR | MatMul us | attention us | other us (nodes, us/node) "
          "| MatMul GFLOP/s | % of big MatMul |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['width']} | {r['graph']} | {r['artifact']} | {r['max_seq_len']} | {r['step_ms']:.3f} | "
                  f"{r['cost_vs_ar']:.2f} | {r['matmul_us']:.0f} | {r['attention_us']:.0f} | {r['other_us']:.0f} "
                  f"({r['other_nodes']}, {r['other_us_per_node']:.1f}) | {r['matmul_gflops']:.1f} | "
                  f"{100 * r['share_of_big_matmul']:.0f}% |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
