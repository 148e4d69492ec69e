"""Peer benchmark: onnxruntime-genai's export of a checkpoint against ours, ONNX Runtime CPU.

    python benchmarks/peer_cpu.py --workdir DIR [--checkpoint CKPT] [--artifact ART ...]
                                  [--peer-precision fp32|int4] [--gguf FILE] [--ar-only]
                                  [--threads 1] [--num-prompts 8] [--prompt-len 32]
                                  [--max-new-tokens 96] [--repeats 5] [--json OUT]

What it does:
1. Builds the peer's model from the same checkpoint (once, into DIR/peer):
   `python -m onnxruntime_genai.models.builder -i CKPT -o DIR/peer -p fp32 -e cpu`
   (`--peer-precision int4`: `-p int4` into DIR/peer-int4, to set against an int4 artifact of ours
   given with `--artifact`; the flag may be given more than once, and the first precision is
   the reference of every ratio).
   onnxruntime-genai is optional (`pip install onnxruntime-genai==0.18.0`); without it the
   script says so in one line and exits 1.
2. Exports our artifact from the same checkpoint into DIR/ours (`tidar-export export`) unless
   `--artifact` names one or more (the first of each precision gives our AR at that precision;
   every one gives a TiDAR setting).
3. Decodes the same prompts greedily with the peer's AR, our AR and our TiDAR decode, all on
   the CPU provider with the same intra-op thread count, interleaved: for each repeat and
   prompt the modes run in a rotating order, so that load changes on a shared machine hit
   every mode alike. No stop token (the peer's EOS is set to the mask token, which is never
   predicted), so every decode produces exactly --max-new-tokens tokens.

With `--gguf FILE` llama.cpp (llama-cpp-python, optional: `pip install llama-cpp-python`)
decodes that GGUF file itself, greedily from the same token ids, as one more mode (a model
imported from that file has the same tokenizer). `--ar-only` leaves out our TiDAR decode.
Greedy agreement with the peer's AR is reported per mode: the share of prompts whose output
equals it, and the mean share of each output before the first differing token.

Tokens/s (per repeat, median and spread over repeats) is the runtime's definition
(tidar_runtime.stats): the tokens after the first over the decode time, the prefill pass
excluded. For the peer the prefill is `append_tokens` (which runs the prompt's forward), and
the decode time is that of the `generate_next_token` calls. Also reported: the ratios to each
peer mode (every onnxruntime-genai build, llama.cpp) of the same repeat, T/NFE, and whether the
greedy outputs of all modes are equal.
Nothing here is a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def build_peer(checkpoint: Path, out: Path, precision: str = "fp32") -> None:
    if (out / "genai_config.json").is_file():
        return
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu"]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Peer:
    """onnxruntime-genai greedy decoding from token ids, no stop token, `threads` intra-op threads."""

    def __init__(self, og, model_dir: Path, threads: int, mask_token_id: int):
        self.og = og
        config = og.Config(str(model_dir))
        config.clear_providers()  # the CPU provider
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        # eos = the TiDAR mask token, which is only ever an input (genai rejects ids outside the
        # vocabulary): the peer runs to max_length like our decodes here; were the mask token
        # ever predicted, the peer would stop there and the equality check would say so
        config.overlay(json.dumps({"model": {"eos_token_id": mask_token_id, "pad_token_id": mask_token_id,
                                             "decoder": {"session_options": opts}}}))
        self.model = og.Model(config)

    def decode(self, prompt: list[int], max_new: int) -> tuple[list[int], float, float]:
        """(new tokens, prefill seconds, decode seconds)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_new, num_beams=1)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t2 = time.perf_counter()
        seq = list(gen.get_sequence(0))[len(prompt):]
        return [int(t) for t in seq], t1 - t0, t2 - t1


class LlamaCpp:
    """llama.cpp (llama-cpp-python) decoding a GGUF file greedily from token ids, `threads` threads."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, verbose=False)

    def decode(self, prompt: list[int], max_new: int) -> tuple[list[int], float, float]:
        """(new tokens, prefill seconds, decode seconds): the first token comes with the prompt's pass."""
        out: list[int] = []
        t0 = time.perf_counter()
        t1 = t0
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            out.append(int(tok))
            if len(out) == 1:
                t1 = time.perf_counter()
            if len(out) == max_new:
                break
        return out, t1 - t0, time.perf_counter() - t1


def agreement(outputs: dict[int, list[int]], ref: dict[int, list[int]]) -> dict:
    """Greedy agreement with `ref`: equal outputs, and the mean share before the first difference."""
    equal, prefix = [], []
    for i, want in ref.items():
        got = outputs.get(i, [])
        n = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        equal.append(got == want)
        prefix.append(n / max(1, len(want)))
    return {"equal_outputs": round(float(np.mean(equal)), 3), "mean_prefix": round(float(np.mean(prefix)), 3)}


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    """The decode settings every peer comparison takes (this script's and cpp_speed.py's)."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="folder for the peer's model and our export")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--artifact", action="append", default=[],
                   help="our artifact(s) from that checkpoint (default: export one into WORKDIR/ours)")
    p.add_argument("--peer-precision", action="append", choices=["fp32", "int4"],
                   help="the peer's build (-p of its builder), repeatable (default fp32); the first is the "
                        "reference of the ratios; set an int4 artifact of ours against int4")
    p.add_argument("--gguf", help="also decode this GGUF file with llama.cpp (llama-cpp-python)")
    p.add_argument("--ar-only", action="store_true", help="leave out our TiDAR decode")
    add_decode_flags(p)
    args = p.parse_args()
    try:
        import onnxruntime_genai as og
    except ImportError:
        return fail("onnxruntime-genai is not installed: pip install onnxruntime-genai==0.18.0")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from tidar_export.bench.demo import demo_model_path
    from tidar_export.bench.measure import artifact_tokenizer, default_prompts, machine, spread
    from tidar_runtime import generate_ar_batch, generate_tidar_batch
    from tidar_runtime.backends.ort import OrtBackend
    from tidar_runtime.stats import rate

    ckpt = Path(args.checkpoint or demo_model_path())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    precisions = list(dict.fromkeys(args.peer_precision or ["fp32"]))
    peer_dirs = {pr: work / ("peer" if pr == "fp32" else f"peer-{pr}") for pr in precisions}
    for pr, peer_dir in peer_dirs.items():
        build_peer(ckpt, peer_dir, pr)
    arts = [Path(a) for a in args.artifact]
    if not arts:
        arts = [work / "ours"]
        if not (arts[0] / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "tidar_export", "export", str(ckpt), "-o", str(arts[0])]
            print("$ tidar-export export CKPT -o WORKDIR/ours", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    backends = [OrtBackend(a, intra_op_threads=args.threads) for a in arts]
    first = backends[0]
    tok = artifact_tokenizer(arts[0], first.manifest)
    prompts, source = default_prompts(tok, first.vocab_size, first.mask_token_id, args.num_prompts,
                                      args.prompt_len, args.max_new_tokens)

    def ours(fn, be):
        def run(prompt, n):
            res = fn(be, [prompt], n)[0]
            return res.tokens, res.stats.prefill_s, sum(res.stats.step_s), res.stats
        return run

    modes, labels = {}, {}
    for pr, peer_dir in peer_dirs.items():
        key = "peer_ar" if pr == precisions[0] else f"peer_ar_{pr}"  # the reference keeps its old key
        modes[key] = lambda prompt, n, peer=Peer(og, peer_dir, args.threads, first.mask_token_id): \
            peer.decode(prompt, n) + (None,)
        labels[key] = f"onnxruntime-genai AR ({pr})"
    ar_of = {}  # our AR: the first artifact of each precision
    for be in backends:
        ar_of.setdefault(be.manifest.precision, be)
    for precision, be in ar_of.items():
        key = "ar" if be is first else f"ar_{precision}"
        modes[key] = ours(generate_ar_batch, be)
        labels[key] = f"ours AR ({precision})"
    if args.gguf:
        try:
            llama = LlamaCpp(Path(args.gguf), args.threads, args.prompt_len + args.max_new_tokens + 8)
        except ImportError:
            return fail("llama-cpp-python is not installed: pip install llama-cpp-python")
        modes["llama_cpp"] = lambda prompt, n: llama.decode(prompt, n) + (None,)
        labels["llama_cpp"] = f"llama.cpp AR ({Path(args.gguf).suffixes[-2].lstrip('.') if len(Path(args.gguf).suffixes) > 1 else 'gguf'})"
    for a, be in zip(arts, backends):
        if args.ar_only:
            break
        key = f"tidar_{be.manifest.precision}_b{be.block_size}_" + "-".join(map(str, be.proposals))
        modes[key] = ours(generate_tidar_batch, be)
        labels[key] = (f"ours TiDAR ({be.manifest.precision}) b={be.block_size} "
                       f"proposals={{{','.join(map(str, be.proposals))}}}")
    names = list(modes)

    for name in names:  # warm-up
        out = modes[name](prompts[0], 4)
    rates = {n: [] for n in names}
    tokens: dict[str, dict[int, list[int]]] = {n: {} for n in names}
    accepted: dict[str, list[int]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        num = {n: 0 for n in names}
        sec = {n: 0.0 for n in names}
        for i, prompt in enumerate(prompts):
            k = (rep * len(prompts) + i) % len(names)
            for name in names[k:] + names[:k]:
                out, _, decode_s, stats = modes[name](prompt, args.max_new_tokens)
                num[name] += len(out) - 1
                sec[name] += decode_s
                tokens[name].setdefault(i, out)
                if stats is not None and rep == 0:
                    accepted[name] += stats.accepted
        for name in names:
            rates[name].append(rate(num[name], sec[name]) or 0.0)
        loads.append(os.getloadavg()[0])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names)
              + " tok/s", file=sys.stderr, flush=True)

    ref = tokens["peer_ar"]
    result = {
        "command": "python benchmarks/peer_cpu.py " + " ".join(sys.argv[1:]),
        "machine": machine() | {"load_avg_1m_during": spread(loads)},
        "prompts": {"source": source, "num": len(prompts), "prompt_len": args.prompt_len},
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
        "modes": {},
        "all_equal": all(tokens[n] == ref for n in names),
    }
    peers = [n for n in names if n.startswith("peer_ar") or n == "llama_cpp"]
    for name in names:
        ratios = {peer: spread([r / b if b else 0.0 for r, b in zip(rates[name], rates[peer])]) for peer in peers}
        acc = accepted[name]
        result["modes"][name] = {
            "label": labels[name],
            "tokens_per_s": spread(rates[name]),
            "ratio_to_peer_ar": ratios["peer_ar"],
            "ratio_to": ratios,  # the same repeat's rate of every peer mode (median [min, max] over repeats)
            "tokens_per_forward": round(sum(acc) / len(acc), 3) if acc else 1.0,
            "equal_to_peer": tokens[name] == ref,
            "agreement_with_peer": agreement(tokens[name], ref),
        }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    heads = "".join(f" / {labels[p]} |" for p in peers)
    print(f"\n| mode | tokens/s median [min, max] |{heads} T/NFE | greedy = {labels['peer_ar']} (outputs, prefix) |")
    print("|---|---|" + "---|" * len(peers) + "---|---|")
    for name in names:
        m = result["modes"][name]
        t = m["tokens_per_s"]
        cols = "".join(f" {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |" for r in m["ratio_to"].values())
        print(f"| {m['label']} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] |{cols} "
              f"{m['tokens_per_forward']:.2f} | "
              f"{m['agreement_with_peer']['equal_outputs']:.2f}, {m['agreement_with_peer']['mean_prefix']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
