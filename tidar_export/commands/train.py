"""`tidar-export train -o RUN`: the TiDAR objective (or the AR baseline) on the stdlib corpus."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tidar_export.errors import TiDARError
from tidar_export.train.trainer import TrainSettings, read_state, train


_FLAGS = {  # TrainSettings field -> (flag, type, help)
    "mode": ("--mode", str, "tidar (docs/ALGORITHM.md section 2) or ar (next-token loss only: the baseline)"),
    "corpus": ("--corpus", str, "'stdlib' (the Python standard library's .py source) or a folder of text files"),
    "pattern": ("--pattern", str, "file glob inside the corpus (default *.py)"),
    "arch": ("--arch", str, "llama | qwen2 | qwen3 (fresh runs)"),
    "vocab_size": ("--vocab-size", int, "BPE vocabulary size (fresh runs)"),
    "hidden_size": ("--hidden-size", int, "model width (fresh runs)"),
    "intermediate_size": ("--intermediate-size", int, "SwiGLU width (fresh runs)"),
    "num_layers": ("--layers", int, "decoder blocks (fresh runs)"),
    "num_heads": ("--heads", int, "query heads (fresh runs)"),
    "num_kv_heads": ("--kv-heads", int, "key/value heads (fresh runs)"),
    "seq_len": ("--seq-len", int, "S: clean tokens per training sequence"),
    "block_size": ("--block-size", int, "b: TiDAR training block size"),
    "ar_weight": ("--ar-weight", float, "a: weight of the AR term"),
    "batch_size": ("--batch-size", int, "sequences per step"),
    "steps": ("--steps", int, "total optimizer steps (the LR schedule spans them)"),
    "lr": ("--lr", float, "peak learning rate"),
    "min_lr_ratio": ("--min-lr-ratio", float, "final LR as a fraction of the peak"),
    "warmup": ("--warmup", int, "linear warm-up steps"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay on matrices"),
    "grad_clip": ("--grad-clip", float, "gradient-norm clip (0 disables)"),
    "seed": ("--seed", int, "seed of the init and the batch sampler"),
    "init_from": ("--init-from", str, "continue from this (imported AR) checkpoint folder instead of scratch"),
    "draft_target": ("--draft-target", str, "what the mask slots learn: data | self | soft | rollout (docs/TRAINING.md)"),
    "rollout_frac": ("--rollout-frac", float, "rollout: share of each batch's rows taken from the rollout pool"),
    "rollout_every": ("--rollout-every", int, "rollout: steps between regenerations of the pool"),
    "rollout_pool": ("--rollout-pool", int, "rollout: rows in the pool"),
    "rollout_prefix_min": ("--rollout-prefix-min", int, "rollout: shortest real prefix of a pool row"),
    "rollout_prefix_max": ("--rollout-prefix-max", int, "rollout: longest real prefix of a pool row"),
    "adapter_rank": ("--adapter-rank", int, "train a draft adapter of this rank on the frozen --init-from model "
                                            "(0: the full-weight recipe)"),
    "adapter_layers": ("--adapter-layers", str, "adapted layers: all | topN | A-B | i,j,k"),
    "adapter_projections": ("--adapter-projections", str, "adapted projections: all | none (the mask-row "
                                                          "offset alone) | a list of q,k,v,o,gate,up,down"),
    "adapter_alpha": ("--adapter-alpha", float, "adapter updates are scaled by alpha / rank (0: alpha = rank)"),
}
# Every TrainSettings field has a flag here (tests/test_docs_commands.py checks it, and that every
# command and flag docs/TRAINING.md shows parses).


def register(subparsers) -> None:
    from tidar_export.commands.args import add_force_flag

    defaults = TrainSettings()
    p = subparsers.add_parser("train", help="train a TiDAR model (or its AR-only baseline) on a text corpus")
    p.add_argument("-o", "--output", required=True, help="run folder: checkpoint + resume state")
    for field, (flag, typ, text) in _FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None,
                       help=f"{text} [default: {getattr(defaults, field)}]")
    p.add_argument("--adapter", action="store_true",
                   help="train a draft adapter (rank 4 unless --adapter-rank) on the frozen --init-from model: "
                        "it acts on mask rows only, so the model's greedy output is unchanged")
    p.add_argument("--no-adapter-embed", dest="adapter_embed", action="store_false", default=None,
                   help="no learned mask-row offset in the adapter")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--mask-token-id", type=int, help="mask token id for --init-from (default: the checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--stop-at", type=int, help="save and stop at this step (continue later with --resume)")
    p.add_argument("--cpu-budget", type=float, metavar="SECONDS",
                   help="save and stop once the steps have used this much CPU time, all threads, counted over "
                        "resumes (runs of different cost compared at equal CPU time)")
    p.add_argument("--save-every", type=int, default=500, help="steps between saves")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only")
    add_force_flag(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {f: getattr(args, f) for f in _FLAGS if getattr(args, f) is not None}
    if args.adapter_embed is not None:
        given["adapter_embed"] = args.adapter_embed
    if args.adapter and "adapter_rank" not in given:
        given["adapter_rank"] = 4
    if args.adapter and "draft_target" not in given:
        given["draft_target"] = "self"
    if args.resume:
        state, _ = read_state(Path(args.output))
        base = state["settings"]
    else:
        base = dataclasses.asdict(TrainSettings())
    try:
        s = TrainSettings(**(base | given))
    except TypeError as e:
        raise TiDARError(f"invalid training settings ({e})") from None
    if args.save_every < 1 or args.log_every < 1:
        raise TiDARError("--save-every and --log-every must be >= 1")
    if args.cpu_budget is not None and not args.cpu_budget > 0:
        raise TiDARError(f"--cpu-budget must be > 0 seconds, got {args.cpu_budget}")
    final = train(s, args.output, resume=args.resume, tokenizer=args.tokenizer, mask_token_id=args.mask_token_id,
                  stop_at=args.stop_at, save_every=args.save_every, log_every=args.log_every,
                  progress=not args.no_progress, log=lambda m: print(m, flush=True), force=args.force,
                  cpu_budget=args.cpu_budget)
    last = final["history"][-1] if final["history"] else {}
    print(json.dumps({"output": str(args.output), "step": final["step"], "elapsed_s": final["elapsed_s"],
                      "cpu_s": final["cpu_s"],
                      "tokens_seen": final["tokens_seen"], "last": last}), flush=True)
    return 0
