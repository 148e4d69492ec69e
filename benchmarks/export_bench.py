"""Export wall time and peak memory of `tidar-export export` (a benchmark, not a test).

    python benchmarks/export_bench.py                        # demo model if present, then Qwen2.5-1.5B shapes
    python benchmarks/export_bench.py --model qwen2.5-1.5b --target trt-10.15 --max-seq-len 2048
    python benchmarks/export_bench.py --model path/to/checkpoint
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/export_bench.py --model qwen3-8b --layers 2 \
        --target trt-10.15 --dtype bf16 --check --workdir DIR   # 8B widths, 2 of its 36 layers

Each export runs in a fresh child process, which reports its own peak resident set size
(getrusage ru_maxrss: torch tensors, numpy buffers and protobufs alike). tracemalloc is not
used: it sees only Python-level allocations, not torch's, and tracing the Python-heavy dynamo
exporter under it tripled the wall time of the tiny model's export. A preset name builds a
randomly initialised checkpoint of that shape first, in the export dtype, written tensor by
tensor into 2 GiB shards (in another child, so its memory is not counted); `--layers` keeps the
preset's widths with fewer layers. `--check` also runs the structural `tidar-export check` on
the artifact in a child of its own. Results are printed as one JSON line per run; docs/EXPORT.md records measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tidar_export" / "demo_model"


def _child_make_checkpoint(preset_name: str, out: str, dtype: str, layers: int) -> None:
    from tidar_export.export.tracing import torch_dtype
    from tidar_export.model.checkpoint import write_random_checkpoint
    from tidar_export.model.config import preset

    cfg = preset(preset_name)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    write_random_checkpoint(cfg, out, dtype=torch_dtype(dtype), seed=0)  # tensor by tensor, bounded shards


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss: KiB on Linux


def _child_check(artifact: str) -> None:
    t0 = time.perf_counter()
    from tidar_export.export.check import check_artifact

    report = check_artifact(artifact)  # structural: files, bindings, the target's operator table
    print(json.dumps({"check_wall_s": round(time.perf_counter() - t0, 1), "check_peak_rss_gib": _peak_rss_gib(),
                      "check_failures": report.failures, "check_warnings": list(getattr(report, "warnings", []))}))


def _child_export(checkpoint: str, out: str, target: str, dtype: str, max_seq_len: int | None,
                  max_batch: int) -> None:
    t0 = time.perf_counter()
    from tidar_export.export.artifact import export_artifact

    lines: list[str] = []
    export_artifact(checkpoint, out, target=target, precision=dtype, max_seq_len=max_seq_len,
                    max_batch=max_batch, log=lines.append)
    wall = time.perf_counter() - t0
    files = {f.name: f.stat().st_size for f in Path(out).iterdir()}
    print(json.dumps({"wall_s": round(wall, 1), "peak_rss_gib": _peak_rss_gib(), "graphs": lines, "files": files}))


def run(model: str, target: str, dtype: str, max_seq_len: int | None, max_batch: int, workdir: Path,
        layers: int = 0, check: bool = False, keep: bool = False) -> dict:
    checkpoint = Path(model)
    made = False
    if not checkpoint.is_dir():  # a preset name: a random checkpoint in the export dtype
        checkpoint = workdir / (f"ckpt-{model}-{dtype}" + (f"-{layers}l" if layers else ""))
        if not checkpoint.is_dir():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child-checkpoint", model, str(checkpoint), dtype, str(layers)],
                           check=True)
            print(f"# built random {model} checkpoint in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        made = True
    out = workdir / f"artifact-{checkpoint.name}-{target}-{dtype}"
    cmd = [sys.executable, __file__, "--child-export", str(checkpoint), str(out), target, dtype,
           str(max_seq_len or 0), str(max_batch)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    if check:
        res = subprocess.run([sys.executable, __file__, "--child-check", str(out)], check=True, capture_output=True,
                             text=True)
        result.update(json.loads(res.stdout.strip().splitlines()[-1]))
    from tidar_export.model.checkpoint import read_config

    cfg = read_config(checkpoint)
    load = os.getloadavg()
    result.update({"model": model if made else checkpoint.name, "layers": cfg.num_layers,
                   "params_m": round(cfg.num_params() / 1e6, 1), "target": target, "dtype": dtype,
                   "max_seq_len": max_seq_len, "max_batch": max_batch,
                   "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                   "load_avg_after": [round(x, 1) for x in load],
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"})
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-checkpoint":
        _child_make_checkpoint(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-check":
        _child_check(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-export":
        ckpt, out, target, dtype, msl, mb = sys.argv[2:8]
        _child_export(ckpt, out, target, dtype, int(msl) or None, int(mb))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="checkpoint folder or preset name (repeatable); "
                    "default: the demo model if present, then qwen2.5-1.5b")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--max-seq-len", type=int, help="default: the exporter's (2048, capped by the model)")
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--workdir", help="where checkpoints and artifacts go (default: a temp dir, removed)")
    ap.add_argument("--layers", type=int, default=0,
                    help="override a preset's layer count (a reduced shape: the preset's widths, fewer layers)")
    ap.add_argument("--check", action="store_true", help="also time `tidar-export check` (structural) on the artifact")
    ap.add_argument("--keep", action="store_true", help="keep the artifact in --workdir")
    args = ap.parse_args()
    models = args.model or ([str(DEMO)] if DEMO.is_dir() else []) + ["qwen2.5-1.5b"]
    if not DEMO.is_dir() and not args.model:
        print(f"# no demo model at {DEMO.relative_to(ROOT)}: skipped", file=sys.stderr)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for model in models:
            result = run(model, args.target, args.dtype, args.max_seq_len, args.max_batch, workdir, args.layers,
                         args.check, args.keep)
            print(json.dumps(result), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
