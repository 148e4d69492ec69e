"""CPU benchmarks of docs/BENCHMARKS.md: export, bench (with the step-cost curve), tune, bench again.

    OMP_NUM_THREADS=1 python benchmarks/cpu_benchmarks.py --out OUT [--checkpoint DIR]

Runs these commands, in order (printed as they start; the same ones docs/BENCHMARKS.md lists):

    tidar-export export CKPT -o OUT/artifact
    tidar-export bench OUT/artifact --checkpoint CKPT --workdir OUT/variants --json OUT/bench.json
                       --markdown OUT/bench.md --plot OUT/bench.png
    tidar-export tune OUT/artifact --checkpoint CKPT --workdir OUT/variants --json OUT/tune.json
                      --markdown OUT/tune.md --plot OUT/tune.png
    tidar-export bench OUT/artifact --json OUT/tuned.json --markdown OUT/tuned.md

then writes OUT/results.md: the three markdown reports, ready to paste into docs/BENCHMARKS.md.
CKPT defaults to the embedded demo model. Extra flags after `--` go to every bench/tune call
(e.g. `-- --repeats 3 --max-new-tokens 64`). Nothing here is a test: the figures depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> None:
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"# done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (artifact, variants, reports, plots)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("extra", nargs="*", help="flags passed to every bench/tune call (after --)")
    args = p.parse_args()
    if args.checkpoint is None:
        from tidar_export.bench.demo import demo_model_path

        args.checkpoint = str(demo_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "tidar_export"]
    art, work = str(out / "artifact"), str(out / "variants")
    run(cli + ["export", args.checkpoint, "-o", art])
    run(cli + ["bench", art, "--checkpoint", args.checkpoint, "--workdir", work, "--json", str(out / "bench.json"),
               "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png")] + args.extra)
    run(cli + ["tune", art, "--checkpoint", args.checkpoint, "--workdir", work, "--json", str(out / "tune.json"),
               "--markdown", str(out / "tune.md"), "--plot", str(out / "tune.png")] + args.extra)
    run(cli + ["bench", art, "--json", str(out / "tuned.json"), "--markdown", str(out / "tuned.md")] + args.extra)
    parts = [("AR vs TiDAR at the exported block size, and the step-cost curve", "bench.md"),
             ("Tuning sweep", "tune.md"), ("AR vs TiDAR at the tuned block size", "tuned.md")]
    text = "".join(f"### {title}\n\n{(out / name).read_text()}\n" for title, name in parts)
    (out / "results.md").write_text(text)
    print(f"wrote {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
