"""`tidar-export bench ARTIFACT_DIR`: AR vs TiDAR tokens/s and the step-cost curve (tidar_export.bench)."""

from __future__ import annotations

import json

from tidar_export.bench.measure import (DEFAULT_COST_ITERS, DEFAULT_MAX_NEW, DEFAULT_NUM_PROMPTS, DEFAULT_PROMPT_LEN,
                                        DEFAULT_REPEATS, DEFAULT_SPARSE, bench, block_size_range)
from tidar_export.bench.report import markdown, plot, require_matplotlib
from tidar_runtime.fileio import write_atomic


def add_measure_flags(p) -> None:
    """Flags shared by bench and tune."""
    from tidar_runtime.backends.select import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="ort", help="runtime backend (default: ort)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1; 0 = ORT's default)")
    p.add_argument("--prompts", help="prompts file: .jsonl (text or {\"text\"}/{\"ids\"} per line) or one text prompt per line")
    p.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="built-in held-out prompts to use")
    p.add_argument("--prompt-len", type=int, default=DEFAULT_PROMPT_LEN, help="tokens per built-in prompt")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW,
                   help=f"tokens decoded per prompt (default: {DEFAULT_MAX_NEW})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="alternating AR/TiDAR repeats")
    p.add_argument("--workdir", help="where step-graph variants exported from --checkpoint are kept and reused "
                   "(default: a temp dir, removed at the end)")
    p.add_argument("--sparse", action="append", metavar="B:R,R,..",
                   help=f"sparse proposal set to include (repeatable; default {' '.join(DEFAULT_SPARSE)})")
    p.add_argument("--cost-iters", type=int, default=DEFAULT_COST_ITERS, help="step-cost rounds (each times 3 calls per point)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write the report's markdown tables")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG plot (needs the `plot` extra: matplotlib)")


def register(sub) -> None:
    p = sub.add_parser("bench", help="AR vs TiDAR tokens/s of an artifact, and the step-cost curve")
    p.add_argument("artifact", help="artifact directory written by `tidar-export export`")
    p.add_argument("--checkpoint", help="checkpoint the artifact came from: adds step graphs of other block sizes "
                   "and proposal sets to the step-cost curve (exported into --workdir)")
    p.add_argument("--curve-block-sizes", type=block_size_range, default=list(range(2, 17)),
                   help="dense block sizes of the curve with --checkpoint (default 2-16)")
    add_measure_flags(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.plot:
        require_matplotlib()
    report = bench(args.artifact, args.backend, args.threads, args.prompts, args.num_prompts, args.prompt_len,
                   args.max_new_tokens, args.repeats, args.checkpoint, args.workdir, args.curve_block_sizes,
                   args.sparse or DEFAULT_SPARSE, args.cost_iters)
    return write_report(args, report, markdown(report), report["step_cost"]["points"])


def write_report(args, report: dict, text: str, curve: list[dict], sweep: list[dict] | None = None) -> int:
    """The outputs bench and tune share: --json, --markdown, --plot, then the markdown on stdout."""
    if args.json_out:
        write_atomic(args.json_out, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.plot:
        plot(args.plot, curve, sweep,
             title=f"{report['artifact']} on {report['machine']['cpu']} ({report['backend']}, {report['threads']} thread)")
    print(text)
    return 0
