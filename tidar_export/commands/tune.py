"""`tidar-export tune ARTIFACT --checkpoint CKPT`: pick the fastest block size / proposal set."""

from __future__ import annotations


from tidar_export.bench import measure as B
from tidar_export.bench.report import curve_points, require_matplotlib, tune_markdown
from tidar_export.commands.bench import add_measure_flags, write_report
from tidar_export.bench.tune import tune


def register(sub) -> None:
    p = sub.add_parser("tune", help="pick the block size / proposal set with the highest measured tokens/s "
                       "and write it into the artifact")
    p.add_argument("artifact", help="artifact directory written by `tidar-export export`")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the artifact was exported from "
                   "(candidates are exported from it)")
    p.add_argument("--block-sizes", type=B.block_size_range, default=list(range(2, 17)),
                   help="dense block sizes to try (default 2-16; those that do not fit the cache are skipped)")
    p.add_argument("--dry-run", action="store_true", help="measure and report, leave the artifact alone")
    p.add_argument("--force", action="store_true", help="replace the artifact even if its folder holds files "
                   "that tidar-export did not write")
    add_measure_flags(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    if args.plot:
        require_matplotlib()
    report = tune(args.artifact, args.checkpoint, args.backend, args.threads, args.prompts, args.num_prompts,
                  args.prompt_len, args.max_new_tokens, args.repeats, args.block_sizes,
                  args.sparse or B.DEFAULT_SPARSE, args.workdir, args.cost_iters, write=not args.dry_run,
                  force=args.force)
    return write_report(args, report, tune_markdown(report), curve_points(report), report["candidates"])
