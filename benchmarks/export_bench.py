"""Export wall time and peak memory of `tidar-export export` (a benchmark, not a test).

    python benchmarks/export_bench.py                        # demo model if present, then Qwen2.5-1.5B shapes
    python benchmarks/export_bench.py --model qwen2.5-1.5b --target trt-10.15 --max-seq-len 2048
    python benchmarks/export_bench.py --model path/to/checkpoint

Each export runs in a fresh child process, which reports its own peak resident set size
(getrusage ru_maxrss: torch tensors, numpy buffers and protobufs alike). tracemalloc is not
used: it sees only Python-level allocations, not torch's, and tracing the Python-heavy dynamo
exporter under it tripled the wall time of the tiny model's export. A preset name builds a
randomly initialised checkpoint of that shape first (in another child, so its memory is not
counted). Results are printed as one JSON line per run; docs/EXPORT.md records measured ones.
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


def _child_make_checkpoint(preset_name: str, out: str) -> None:
    import torch

    from tidar_export.model.checkpoint import save_checkpoint
    from tidar_export.model.config import preset
    from tidar_export.model.transformer import TiDARModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = TiDARModel(preset(preset_name))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
            elif "norm" in name:
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.zeros_(p)
    save_checkpoint(model, out)


def _child_export(checkpoint: str, out: str, target: str, dtype: str, max_seq_len: int | None,
                  max_batch: int) -> None:
    t0 = time.perf_counter()
    from tidar_export.export.artifact import export_artifact

    lines: list[str] = []
    export_artifact(checkpoint, out, target=target, precision=dtype, max_seq_len=max_seq_len,
                    max_batch=max_batch, log=lines.append)
    wall = time.perf_counter() - t0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    files = {f.name: f.stat().st_size for f in Path(out).iterdir()}
    print(json.dumps({"wall_s": round(wall, 1), "peak_rss_gib": round(rss_kib / 2**20, 2), "graphs": lines,
                      "files": files}))


def run(model: str, target: str, dtype: str, max_seq_len: int | None, max_batch: int, workdir: Path) -> dict:
    checkpoint = Path(model)
    made = False
    if not checkpoint.is_dir():  # a preset name
        checkpoint = workdir / f"ckpt-{model}"
        if not checkpoint.is_dir():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child-checkpoint", model, str(checkpoint)], check=True)
            print(f"# built random {model} checkpoint in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            made = True
    out = workdir / f"artifact-{checkpoint.name}-{target}-{dtype}"
    cmd = [sys.executable, __file__, "--child-export", str(checkpoint), str(out), target, dtype,
           str(max_seq_len or 0), str(max_batch)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    from tidar_export.model.checkpoint import read_config

    cfg = read_config(checkpoint)
    result.update({"model": model if made or not Path(model).is_dir() else checkpoint.name,
                   "params_m": round(cfg.num_params() / 1e6, 1), "target": target, "dtype": dtype,
                   "max_seq_len": max_seq_len, "max_batch": max_batch,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"})
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-checkpoint":
        _child_make_checkpoint(sys.argv[2], sys.argv[3])
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
    args = ap.parse_args()
    models = args.model or ([str(DEMO)] if DEMO.is_dir() else []) + ["qwen2.5-1.5b"]
    if not DEMO.is_dir() and not args.model:
        print(f"# no demo model at {DEMO.relative_to(ROOT)}: skipped", file=sys.stderr)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for model in models:
            result = run(model, args.target, args.dtype, args.max_seq_len, args.max_batch, workdir)
            print(json.dumps(result), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
