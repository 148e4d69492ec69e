"""`tidar-export generate`: run the decode loop over an exported artifact.

Torch is not imported here unless `--backend torch` is chosen: the runtime path needs only
numpy, the tokenizer and the chosen backend.
"""

from __future__ import annotations

import json
import sys

from tidar_export.commands.args import int_list, prompt_ids, require_prompt
from tidar_export.errors import TiDARError
from tidar_runtime.tokenizer import artifact_tokenizer, default_stop_tokens


def run_generate(args) -> int:
    from tidar_runtime import SamplingParams, stream_ar, stream_tidar, text_pieces
    from tidar_runtime.backends.select import open_backend
    from tidar_runtime.manifest import load_manifest
    from tidar_runtime.stats import summarize

    require_prompt(args)
    if args.max_new_tokens < 1:
        raise TiDARError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # one-line SamplingError if invalid
    if args.checkpoint is not None and args.backend != "torch":
        raise TiDARError("--checkpoint is read only by --backend torch (the other backends run the artifact)")
    manifest = load_manifest(args.artifact)  # before the tokenizer and the backend: version, files
    tok = artifact_tokenizer(args.artifact, manifest)
    stop = default_stop_tokens(manifest)
    if args.chat:
        ids, stop = chat_prompt(args, manifest, tok)
    else:
        if args.system is not None:
            raise TiDARError("--system needs --chat")
        ids = prompt_ids(args.artifact, args.prompt, args.prompt_ids)
    kwargs = {"checkpoint": args.checkpoint} if args.backend == "torch" else {}
    backend = open_backend(args.backend, args.artifact, **kwargs)
    stop = args.stop_ids if args.stop_ids is not None else stop
    run = stream_tidar if args.mode == "tidar" else stream_ar
    stream = run(backend, [ids], args.max_new_tokens, params, stop)
    if args.stream and tok is not None:
        for piece in text_pieces(stream, tok.decode):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for _ in stream:
            pass
    result = stream.results[0]
    text = tok.decode(result.tokens) if tok is not None else None
    report = {"mode": args.mode, "backend": args.backend, "text": text, "token_ids": result.tokens,
              **summarize(result)}
    if args.json:
        print(json.dumps(report))
    elif not (args.stream and tok is not None):
        print(text if text is not None else ",".join(map(str, result.tokens)))
    if not args.json:
        print(f"[{args.mode}/{args.backend}] {report['new_tokens']} tokens, {report['tokens_per_forward']} "
              f"tokens/forward, {report['tokens_per_s']} tokens/s, finish: {report['finish_reason']}",
              file=sys.stderr)
    return 0


def chat_prompt(args, manifest, tok) -> tuple[list[int], list[int]]:
    """--chat: (the prompt ids of --system and --prompt rendered with the artifact's chat template,
    the ids that end the assistant's turn)."""
    from tidar_runtime.chat import artifact_chat

    if args.prompt is None:
        raise TiDARError("--chat needs --prompt TEXT (the user's message), not --prompt-ids")
    chat = artifact_chat(args.artifact, tok, manifest)
    if chat is None:
        raise TiDARError(f"{args.artifact} has no chat template (chat_template.jinja): drop --chat, or import "
                         "the model from a folder or GGUF file that has one")
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": args.prompt}]
    return chat.encode(messages), chat.stop_ids


def register(sub) -> None:
    from tidar_runtime.backends.select import BACKENDS

    p = sub.add_parser("generate", help="decode with an exported artifact (ONNX Runtime, TensorRT or torch)")
    p.add_argument("artifact", help="artifact directory written by `tidar-export export`")
    p.add_argument("--prompt", help="prompt text (needs the artifact's tokenizer.json)")
    p.add_argument("--prompt-ids", type=int_list, help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: render it with the artifact's chat template and stop at "
                        "the end of the assistant's turn")
    p.add_argument("--system", help="--chat: a system message before the user's")
    p.add_argument("--mode", choices=["tidar", "ar"], default="tidar",
                   help="tidar: draft and verify in one pass (default); ar: one token per pass")
    p.add_argument("--backend", default="ort", help=f"{' | '.join(BACKENDS)} (default: ort)")
    p.add_argument("--checkpoint", help="--backend torch: the checkpoint the artifact was exported from")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, help="seed of sampling (default: random)")
    p.add_argument("--stop-ids", type=int_list,
                   help="stop token ids (default: the tokenizer's eos ids; with --chat also the end-of-turn token)")
    p.add_argument("--stream", action="store_true", help="print text as it is decided")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and figures")
    p.set_defaults(func=run_generate)
