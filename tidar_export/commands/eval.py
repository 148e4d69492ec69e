"""`tidar-export eval CHECKPOINT`: held-out AR loss, per-slot diffusion accuracy and greedy T/NFE."""

from __future__ import annotations

import json
from pathlib import Path

from tidar_export.train.evaluate import evaluate


def register(subparsers) -> None:
    from tidar_export.commands.args import int_list

    p = subparsers.add_parser("eval", help="held-out AR loss / accuracy and greedy TiDAR T/NFE of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder with tokenizer.json")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' or the folder the model was trained on")
    p.add_argument("--pattern", default="*.py", help="file glob inside the corpus")
    p.add_argument("--seq-len", type=int, help="window of the loss evaluation (default: min(256, max positions))")
    p.add_argument("--max-eval-tokens", type=int, default=65536, help="held-out tokens scored for the loss")
    p.add_argument("--block-sizes", type=int_list, default=[4, 8, 16], help="TiDAR block sizes to decode with")
    p.add_argument("--sparse", action="append", default=[], metavar="B:R,R",
                   help="also decode with this sparse proposal set, e.g. 3:1 (repeatable)")
    p.add_argument("--num-prompts", type=int, default=20, help="held-out prompts decoded per block size (default: 20)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens decoded per prompt (default: 128)")
    p.add_argument("--reference", metavar="CKPT",
                   help="also decode this checkpoint greedily (the model a full-weight run started from) and "
                        "report how far the checkpoint's greedy outputs agree with it")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("-o", "--output", help="also write the report to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from tidar_export.bench.measure import parse_sparse

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = evaluate(args.checkpoint, args.corpus, args.pattern, args.seq_len, args.max_eval_tokens,
                      tuple(args.block_sizes), args.num_prompts, args.prompt_len, args.max_new_tokens,
                      parse_sparse(args.sparse), args.reference)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0
