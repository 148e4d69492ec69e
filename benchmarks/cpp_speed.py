"""The C++ runtime (cpp/) against the Python runtime and onnxruntime-genai, ONNX Runtime CPU.

    python benchmarks/cpp_speed.py --build DIR --workdir WORK [--artifact ART] [--threads 1]
                                   [--num-prompts 8] [--prompt-len 32] [--max-new-tokens 96]
                                   [--repeats 5] [--json OUT]

DIR is a folder `bash cpp/build.sh DIR` built (it holds tidar-bench). Two measurements:
1. Host time per decode step of the loop alone, over a backend that does no work (Python:
   NullBackend through benchmarks/loop_overhead.py's loop_overhead; C++: the same outputs through
   `tidar-bench loop`), at the artifact's b and vocabulary: TiDAR greedy with k = 1 and k = b
   accepted, TiDAR sampling, AR greedy and sampling. Each case runs Python then C++, per repeat.
2. Tokens/s of greedy decoding on the artifact (default: the demo model's, exported into the
   `tidar-export demo` cache): onnxruntime-genai's AR (its export of the same checkpoint, built
   into WORK/peer as benchmarks/peer_cpu.py does), the Python runtime's AR and TiDAR (OrtBackend)
   and the C++ runtime's AR and TiDAR (one persistent `tidar-bench decode` process per mode), all
   with --threads intra-op threads, interleaved in a rotating order per prompt. Tokens/s is the
   runtime's definition: the tokens after the first over the decode forwards' time.
Nothing here is a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def cpp_loop(build: Path, b: int, vocab: int, accept: int, mode: str, sampling: bool, tokens: int, repeats: int) -> float:
    cmd = [str(build / "tidar-bench"), "loop", "--block-size", str(b), "--vocab", str(vocab), "--accept", str(accept),
           "--mode", mode, "--tokens", str(tokens), "--repeats", str(repeats)] + (["--sampling"] if sampling else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["us_per_step"]


class CppDecoder:
    """A persistent `tidar-bench decode` process: one prompt in, one result out."""

    def __init__(self, build: Path, artifact: Path, mode: str, threads: int, max_new: int):
        self.proc = subprocess.Popen([str(build / "tidar-bench"), "decode", str(artifact), "--mode", mode,
                                     "--threads", str(threads), "--max-new-tokens", str(max_new)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, prompt: list[int], n: int):
        self.proc.stdin.write(",".join(map(str, prompt)) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return r["token_ids"], r["prefill_s"], r["decode_s"], r["accepted"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", required=True, help="the folder cpp/build.sh built")
    p.add_argument("--workdir", required=True, help="folder for onnxruntime-genai's export")
    p.add_argument("--artifact", help="artifact of the demo model (default: the `tidar-export demo` cache)")
    from peer_cpu import Peer, add_decode_flags, build_peer  # this folder's script (sys.path[0])

    add_decode_flags(p)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import onnxruntime_genai as og
    from loop_overhead import loop_overhead

    from tidar_export.bench.demo import default_artifact_dir, demo_model_path, ensure_demo_artifact
    from tidar_export.bench.measure import artifact_tokenizer, default_prompts, machine, spread
    from tidar_runtime import generate_ar_batch, generate_tidar_batch
    from tidar_runtime.backends.ort import OrtBackend
    from tidar_runtime.stats import rate

    build, work = Path(args.build), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    art, _ = ensure_demo_artifact(Path(args.artifact) if args.artifact else default_artifact_dir(),
                                  log=lambda m: print(m, file=sys.stderr))
    backend = OrtBackend(art, intra_op_threads=args.threads)
    b, vocab = backend.block_size, backend.vocab_size

    # 1. the loop's host time per step
    loop = []
    for mode, sampling, k in [("tidar", False, 1), ("tidar", False, b), ("tidar", True, b), ("ar", False, 1),
                              ("ar", True, 1)]:
        tokens = 512 if sampling else 4096
        py, cpp = [], []
        for _ in range(args.repeats):
            py.append(loop_overhead(b, vocab, k, mode, sampling, tokens, 1)["us_per_step"])
            cpp.append(cpp_loop(build, b, vocab, k, mode, sampling, tokens, 1))
        row = {"mode": mode, "sampling": sampling, "accept": k if mode == "tidar" and not sampling else None,
               "python_us_per_step": round(statistics.median(py), 2), "cpp_us_per_step": round(statistics.median(cpp), 3)}
        row["python_over_cpp"] = round(row["python_us_per_step"] / row["cpp_us_per_step"], 1)
        loop.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    # 2. tokens/s on the artifact
    build_peer(demo_model_path(), work / "peer")
    tok = artifact_tokenizer(art, backend.manifest)
    prompts, source = default_prompts(tok, vocab, backend.mask_token_id, args.num_prompts, args.prompt_len,
                                      args.max_new_tokens)
    peer = Peer(og, work / "peer", args.threads, backend.mask_token_id)

    def python(fn):
        def run(prompt, n):
            r = fn(backend, [prompt], n)[0]
            return r.tokens, r.stats.prefill_s, sum(r.stats.step_s), r.stats.accepted
        return run

    cpp = {m: CppDecoder(build, art, m, args.threads, args.max_new_tokens) for m in ("ar", "tidar")}
    modes = {"peer_ar": lambda prompt, n: peer.decode(prompt, n) + ([],), "python_ar": python(generate_ar_batch),
             "python_tidar": python(generate_tidar_batch), "cpp_ar": cpp["ar"], "cpp_tidar": cpp["tidar"]}
    names = list(modes)
    for name in names:  # warm-up (the C++ decoders' n is fixed: --max-new-tokens)
        modes[name](prompts[0], args.max_new_tokens)
    rates = {n: [] for n in names}
    tokens = {n: {} for n in names}
    accepted = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        num, sec = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
        for i, prompt in enumerate(prompts):
            k = (rep * len(prompts) + i) % len(names)
            for name in names[k:] + names[:k]:
                out, _, decode_s, acc = modes[name](prompt, args.max_new_tokens)
                num[name] += len(out) - 1
                sec[name] += decode_s
                tokens[name].setdefault(i, out)
                if rep == 0:
                    accepted[name] += acc
        for name in names:
            rates[name].append(rate(num[name], sec[name]) or 0.0)
        loads.append(os.getloadavg()[0])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names) + " tok/s",
              file=sys.stderr, flush=True)
    for d in cpp.values():
        d.close()
    result = {
        "command": "python benchmarks/cpp_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine() | {"load_avg_1m_during": spread(loads)},
        "artifact": {"block_size": b, "proposals": list(backend.proposals), "vocab_size": vocab},
        "prompts": {"source": source, "num": len(prompts), "prompt_len": args.prompt_len},
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
        "loop": loop, "decode": {},
        "all_equal": all(tokens[n] == tokens["peer_ar"] for n in names),
    }
    for name in names:
        ratio = [r / p if p else 0.0 for r, p in zip(rates[name], rates["peer_ar"])]
        acc = accepted[name]
        result["decode"][name] = {"tokens_per_s": spread(rates[name]), "ratio_to_peer_ar": spread(ratio),
                                  "tokens_per_forward": round(sum(acc) / len(acc), 3) if acc else 1.0}
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print("\n| loop over a no-work backend | Python µs / step | C++ µs / step | Python / C++ |\n|---|---|---|---|")
    for r in loop:
        what = f"{r['mode']} {'sampling T=1' if r['sampling'] else 'greedy'}" + (f", k = {r['accept']}" if r["accept"] else "")
        print(f"| {what} | {r['python_us_per_step']} | {r['cpp_us_per_step']} | {r['python_over_cpp']} |")
    print("\n| decode | tokens/s median [min, max] | ratio to onnxruntime-genai AR median [min, max] | T/NFE |\n|---|---|---|---|")
    for name in names:
        m = result["decode"][name]
        t, r = m["tokens_per_s"], m["ratio_to_peer_ar"]
        print(f"| {name} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] | {r['median']:.2f} [{r['min']:.2f}, "
              f"{r['max']:.2f}] | {m['tokens_per_forward']:.2f} |")
    print(f"\ngreedy outputs of all modes equal: {result['all_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
