"""Per-graph call time of artifacts' step / ar_step graphs: ONNX Runtime CPU, the runtime's I/O binding.

    OMP_NUM_THREADS=1 python benchmarks/graph_timing.py ART [ART ...] [--kinds ar_step,step]
                                                        [--runs 21] [--iters 500] [--cache-len 128]

Each artifact's graphs run through `OrtBackend` (one intra-op thread) with the binding the
decode loop uses, on a random cache with every row at `--cache-len`. After 50 warm-up calls,
each run times `--iters` calls of one graph; runs rotate over all artifacts and graphs, so
that load changes on a shared machine hit every artifact alike. Printed per graph: the median
over the runs of the mean call time (and min, max), and the difference to the first artifact.
Used for the fused-projection figures of docs/GRAPHS.md. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    from tidar_runtime.backends.ort import OrtBackend
    from tidar_runtime.contract import CACHE_LEN, ids_input

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--kinds", default="ar_step,step")
    p.add_argument("--runs", type=int, default=21)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--cache-len", type=int, default=128)
    a = p.parse_args(argv)
    kinds = a.kinds.split(",")
    rng = np.random.default_rng(0)
    jobs, backends = [], []
    for art in a.artifacts:
        be = OrtBackend(art, intra_op_threads=1)
        backends.append(be)  # the bindings point into its arrays: keep it alive
        for c in be.cache:
            c[...] = rng.standard_normal(c.shape).astype(c.dtype)
        for kind in kinds:
            inputs = be._out[kind]["inputs"]
            ids = ids_input(kind)
            inputs[ids][...] = rng.integers(2, be.vocab_size, inputs[ids].shape)
            inputs[CACHE_LEN][...] = min(a.cache_len, be.max_len - inputs[ids].shape[1])
            sess, io = be.session(kind), be._binding(kind)
            for _ in range(50):
                sess.run_with_iobinding(io)
            jobs.append((art, kind, sess, io))
    times: dict[tuple[str, str], list[float]] = {(art, kind): [] for art, kind, _, _ in jobs}
    for _ in range(a.runs):
        for art, kind, sess, io in jobs:
            t0 = time.perf_counter()
            for _ in range(a.iters):
                sess.run_with_iobinding(io)
            times[(art, kind)].append((time.perf_counter() - t0) / a.iters * 1e6)
    for kind in kinds:
        base = None
        for art in a.artifacts:
            t = times[(art, kind)]
            med = statistics.median(t)
            base = base or med
            print(f"{kind:8s} {art:40s} median {med:8.1f} us (min {min(t):8.1f}, max {max(t):8.1f}) "
                  f"{100 * (med / base - 1):+5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
