"""`tidar-export init | import | info | decode`: checkpoints and the torch reference decode."""

from __future__ import annotations

import argparse
import json

from tidar_export.errors import TiDARError
from tidar_runtime.contract import FLOAT_PRECISIONS

from tidar_export.commands.args import add_force_flag, int_list, prompt_ids, require_prompt


def _add_tidar_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, help="TiDAR block size b (default: the checkpoint's)")
    p.add_argument("--mask-token-id", type=int, help="TiDAR mask token id (default: the checkpoint's)")


def cmd_init(args) -> int:
    from tidar_export.export.tracing import torch_dtype
    from tidar_export.model.checkpoint import write_random_checkpoint
    from tidar_export.model.config import preset

    cfg = preset(args.preset)
    if args.block_size is not None:
        cfg = cfg.replace(block_size=args.block_size)
    if args.seed < 0:
        raise TiDARError(f"--seed must be >= 0, got {args.seed}")
    # Tensor by tensor into bounded shards: a qwen3-8b checkpoint never sits in memory whole.
    out = write_random_checkpoint(cfg, args.output, dtype=torch_dtype(args.dtype), seed=args.seed,
                                  force=args.force)
    print(f"wrote random {args.preset} checkpoint ({cfg.num_params() / 1e6:.2f}M params, {args.dtype}) to {out}")
    return 0


def cmd_import(args) -> int:
    from pathlib import Path

    from tidar_export.model.checkpoint import load_checkpoint, save_checkpoint
    from tidar_runtime.fileio import prepare_output

    if Path(args.checkpoint).is_file():  # a GGUF file (llama.cpp's format)
        from tidar_export.model.gguf_import import import_gguf

        out, cfg = import_gguf(args.checkpoint, args.output, args.block_size, args.mask_token_id, args.force)
        print(f"imported {cfg.arch} GGUF ({cfg.num_params() / 1e6:.1f}M params) to {out}")
        return 0
    prepare_output(args.output, "checkpoint", args.force, inputs=[args.checkpoint])  # before loading
    model = load_checkpoint(args.checkpoint, args.block_size, args.mask_token_id)
    out = save_checkpoint(model, args.output, tokenizer_from=args.checkpoint, force=args.force)
    print(f"imported {model.cfg.arch} checkpoint ({model.cfg.num_params() / 1e6:.1f}M params) to {out}")
    return 0


def cmd_info(args) -> int:
    import dataclasses

    from tidar_export.model.checkpoint import read_config

    cfg = read_config(args.checkpoint, args.block_size, args.mask_token_id)
    info = dataclasses.asdict(cfg) | {"num_params": cfg.num_params()}
    print(json.dumps(info, indent=2))
    return 0


def cmd_decode(args) -> int:
    from tidar_export.model.checkpoint import load_checkpoint
    from tidar_export.model.reference import TorchBackend
    from tidar_runtime import SamplingParams, generate_ar, generate_tidar
    from tidar_runtime.stats import summarize


    require_prompt(args)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # one-line error if invalid
    if args.max_new_tokens < 1:
        raise TiDARError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = load_checkpoint(args.checkpoint, args.block_size, args.mask_token_id)
    if not 1 <= args.max_len <= model.cfg.max_position_embeddings:
        raise TiDARError(f"--max-len must be in 1..{model.cfg.max_position_embeddings} (the checkpoint's "
                         f"max_position_embeddings), got {args.max_len}")
    prompt = prompt_ids(args.checkpoint, args.prompt, args.prompt_ids)
    stop = model.cfg.eos_ids
    modes = ["ar", "tidar"] if args.mode == "both" else [args.mode]
    results = {}
    for mode in modes:
        backend = TorchBackend(model, args.max_len, args.block_size, args.proposals)
        run = generate_tidar if mode == "tidar" else generate_ar
        res = run(backend, prompt, args.max_new_tokens, params, stop)
        results[mode] = {
            "tokens": res.tokens,
            "finish_reason": res.finish_reason,
            "forwards": res.stats.forwards,
            "tokens_per_forward": round(res.stats.tokens_per_forward, 3),
            "accepted_histogram": res.stats.histogram,
            "tokens_per_s": summarize(res)["tokens_per_s"],
        }
    if len(modes) == 2:
        results["tidar_equals_ar"] = results["tidar"]["tokens"] == results["ar"]["tokens"]
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset shape")
    p.add_argument("--preset", default="tiny", help="tiny | qwen2.5-1.5b | smollm2-135m | qwen3-8b")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--block-size", type=int, help="TiDAR block size to record")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--dtype", choices=tuple(FLOAT_PRECISIONS), default="fp32",
                   help="dtype of the written tensors (default fp32)")
    add_force_flag(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("import", help="import a local HF Llama/Qwen2/Qwen3 folder or GGUF file with TiDAR settings")
    p.add_argument("checkpoint", help="HF-format folder (config.json + safetensors), or a .gguf file "
                   "(needs the gguf extra)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    _add_tidar_flags(p)
    add_force_flag(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="print the model config of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder (config.json)")
    _add_tidar_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("decode", help="decode with the torch reference model (TiDAR and/or AR)")
    p.add_argument("checkpoint", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    p.add_argument("--prompt-ids", type=int_list, help="prompt as comma-separated token ids")
    p.add_argument("--mode", choices=["tidar", "ar", "both"], default="both",
                   help="decode with TiDAR, AR, or both and compare (default: both)")
    p.add_argument("--proposals", type=int_list, help="sparse proposal blocks, e.g. 1,4,7 (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    p.add_argument("--max-len", type=int, default=512, help="KV cache slots")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, help="seed of sampling (default: random)")
    p.add_argument("--json", action="store_true", help="print one compact JSON line")
    _add_tidar_flags(p)
    p.set_defaults(func=cmd_decode)
