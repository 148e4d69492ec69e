"""GPU benchmarks of docs/BENCHMARKS.md: the step-cost curve of a Qwen2.5-1.5B-shaped model and
the demo model's AR vs TiDAR tokens/s, torch backend under CUDA graphs. Needs CUDA.

    python benchmarks/gpu_step_cost.py [--preset qwen2.5-1.5b] [--dtype bf16] [--max-len 2048]
                                       [--json OUT] [--markdown OUT] [--plot OUT.png]

Without CUDA it prints why it skipped and exits with status 0; `--allow-cpu` runs the same code
eagerly on the CPU (no CUDA graphs, `--preset tiny` advised) to check it, not to measure.

1. Step-cost curve: a randomly initialised model of the preset's shape (the costs depend on
   shapes, not on weights), one forward per point: width 1 (AR step), b + b*b for dense b in
   --block-sizes, and the --sparse sets; each captured once in a CUDA graph (static shapes:
   ids, positions, cache_len and the cache are fixed buffers; the step's K/V are written into
   the cache in-graph at L with an in-place scatter, as the ORT "slice" graphs + runtime do)
   and replayed. Points are timed round-robin with CUDA events, --iters replays each, at a
   cache length of --max-len / 2.
2. The demo model (tidar_export.bench.demo.demo_model_path(), or --demo-checkpoint) decoded by the
   runtime's loop over `GraphedTorchBackend` (below): AR and TiDAR alternating, exactly as
   `tidar-export bench` measures (tidar_export.bench.measure.measure_decode), at the checkpoint's
   block size and at --demo-block-sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tidar_runtime.contract import prefill_out_rows
from tidar_runtime.loop import Outputs


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class GraphedTorchBackend:
    """The reference model as a runtime backend (tidar_runtime.loop.Backend), decode passes under
    CUDA graphs. Cache: [B, KV, max_len, hd] per layer on the device; each pass attends over
    [cache | new] (kv_update="slice") and scatters its new K/V into the cache at L in place."""

    def __init__(self, model, max_len: int, block_size: int, proposals=None, device: str = "cuda",
                 graphs: bool = True):
        import torch

        from tidar_export.model import masks
        from tidar_runtime.contract import normalize_proposals, step_out_rows

        self.torch, self.model, self.device, self.graphs = torch, model.eval(), device, graphs
        self.block_size = block_size
        self.proposals = normalize_proposals(block_size, proposals)
        self.max_len, self.max_batch, self.mask_token_id = max_len, 1, model.cfg.mask_token_id
        self.vocab_size = model.cfg.vocab_size  # the Backend protocol: prompts are checked against it
        self.keys, self.values = model.new_cache(1, max_len, device=device)
        b = block_size
        self._masks = masks
        dev = lambda t: t.to(device)  # noqa: E731
        self._kinds = {
            "step": dict(width=len(masks.step_offsets(b, self.proposals)), b=b,
                         offsets=dev(masks.step_offsets(b, self.proposals)),
                         mask=dev(masks.step_mask(b, self.proposals)),
                         rows=dev(torch.tensor(step_out_rows(b, self.proposals)))),
            "ar_step": dict(width=1, b=1, offsets=dev(torch.zeros(1, dtype=torch.long)),
                            mask=dev(masks.causal_mask(1)), rows=dev(torch.tensor([0]))),
        }
        for k in self._kinds.values():
            k["ids"] = torch.full((1, k["width"]), self.mask_token_id, dtype=torch.long, device=device)
            k["cache_len"] = torch.zeros(1, dtype=torch.long, device=device)
            k["graph"] = None

    @property
    def width(self) -> int:
        return self._kinds["step"]["width"]

    def _pass(self, ids, positions, mask, cache_len, rows):
        """One forward; writes its K/V at cache_len; returns the argmax of `rows` ([B, rows])."""
        torch = self.torch
        logits, new_k, new_v = self.model(ids, positions, mask, self.keys, self.values, cache_len, kv_update="slice")
        T = ids.shape[1]
        idx = (cache_len[:, None] + torch.arange(T, device=ids.device))[:, None, :, None]
        for cache, new in zip(self.keys + self.values, new_k + new_v):
            cache.scatter_(2, idx.expand_as(new), new)
        return logits[:, rows].float().argmax(-1)

    def _static(self, kind: str):
        """The pass of `kind` over its fixed input buffers: captured on first use, then replayed."""
        torch, k = self.torch, self._kinds[kind]
        run = lambda: self._pass(k["ids"], k["cache_len"][:, None] + k["offsets"], k["mask"], k["cache_len"],  # noqa: E731
                                 k["rows"])
        if not self.graphs:
            return run()
        if k["graph"] is None:
            saved = [c.clone() for c in self.keys + self.values]  # warm-up passes write the cache
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.no_grad():
                k["out"] = run()
            k["graph"] = g
            for c, s in zip(self.keys + self.values, saved):
                c.copy_(s)
        k["graph"].replay()
        return k["out"]

    def _run(self, kind: str, ids: np.ndarray, cache_len: np.ndarray) -> Outputs:
        k = self._kinds[kind]
        k["ids"][:, : ids.shape[1]].copy_(self.torch.from_numpy(ids))
        k["cache_len"].copy_(self.torch.from_numpy(cache_len))
        with self.torch.no_grad():
            out = self._static(kind)
        return Outputs(out.cpu().numpy())

    def step(self, drafts, cache_len, want_logits=False):
        return self._run("step", drafts, cache_len)

    def ar_step(self, tokens, cache_len, want_logits=False):
        return self._run("ar_step", tokens, cache_len)

    def _eager(self, ids, positions, mask, rows) -> Outputs:
        torch = self.torch
        with torch.no_grad():
            out = self._pass(ids.to(self.device)[None], positions.to(self.device)[None], mask.to(self.device),
                             torch.zeros(1, dtype=torch.long, device=self.device), torch.as_tensor(rows, device=self.device))
        return Outputs(out.cpu().numpy())

    def prefill(self, row, prompt, want_logits=False):
        torch, m, b, P = self.torch, self._masks, self.block_size, len(prompt)
        ids = torch.cat([torch.as_tensor(prompt, dtype=torch.long), torch.full((b,), self.mask_token_id)])
        return self._eager(ids, m.prefill_positions(P, b), m.prefill_mask(P, b), prefill_out_rows(P, b))

    def ar_prefill(self, row, prompt, want_logits=False):
        torch, P = self.torch, len(prompt)
        return self._eager(torch.as_tensor(prompt, dtype=torch.long), torch.arange(P), self._masks.causal_mask(P), [P - 1])

    def time_pass(self, kind: str, cache_len: int) -> callable:
        """A function that runs one pass of `kind` at `cache_len` (for the step-cost curve)."""
        k = self._kinds[kind]
        k["cache_len"].fill_(cache_len)
        return lambda: self._static(kind)


def random_model(preset_name: str, dtype, device: str):
    import torch

    from tidar_export.model.config import preset
    from tidar_export.model.transformer import TiDARModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = TiDARModel(preset(preset_name))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(std=0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return model.to(dtype).eval()


def step_cost_curve(args, device: str) -> dict:
    import torch

    from tidar_export.bench.measure import parse_sparse
    from tidar_runtime.contract import step_len

    model = random_model(args.preset, _dtype(args.dtype), device)
    wanted = [(1, None)] + [(b, None) for b in args.block_sizes] + parse_sparse(args.sparse)
    points, timers = [], []
    L = args.max_len // 2
    for b, rs in wanted:
        w = 1 if b == 1 else step_len(b, rs or None)
        if L + w > args.max_len:
            continue
        be = GraphedTorchBackend(model, args.max_len, max(b, 2), rs, device, graphs=device == "cuda")
        kind = "ar_step" if b == 1 else "step"
        points.append({"block_size": b, "proposals": [] if b == 1 else list(be.proposals), "width": w})
        timers.append(be.time_pass(kind, L))
        timers[-1]()  # capture
        print(f"captured width {w}", file=sys.stderr, flush=True)
    times = [[] for _ in points]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.iters):
        for n, fn in enumerate(timers):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                sync()
                times[n].append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                fn()
                times[n].append((time.perf_counter() - t0) * 1e3)
    for p, ts in zip(points, times):
        p["ms_p50"] = round(float(np.median(ts)), 4)
        p["ms_min"] = round(float(np.min(ts)), 4)
    cost1 = points[0]["ms_p50"]
    for p in points:
        p["cost_ratio"] = round(p["ms_p50"] / cost1, 3)
    return {"preset": args.preset, "dtype": args.dtype, "max_len": args.max_len, "cache_len": L,
            "iters": args.iters, "cuda_graphs": device == "cuda", "points": points}


def demo_decode(args, device: str) -> list[dict]:
    from tidar_export.train import data
    from tidar_export.bench.measure import default_prompts, measure_decode
    from tidar_export.model.checkpoint import load_checkpoint
    from tidar_export.bench.demo import demo_model_path

    ckpt = Path(args.demo_checkpoint or demo_model_path())
    model = load_checkpoint(ckpt).to(device).eval()
    tok = data.load_tokenizer(ckpt)
    prompts, _ = default_prompts(tok, model.cfg.vocab_size, model.cfg.mask_token_id, args.num_prompts,
                                 args.prompt_len, args.max_new_tokens)
    rows = []
    for b in args.demo_block_sizes or [model.cfg.block_size]:
        max_len = min(model.cfg.max_position_embeddings, args.prompt_len + args.max_new_tokens + b * (b + 1) + 1)
        be = GraphedTorchBackend(model, max_len, b, None, device, graphs=device == "cuda")
        r = measure_decode(be, prompts, args.max_new_tokens, args.repeats,
                           progress=lambda s: print(f"b={b}: {s}", file=sys.stderr, flush=True))
        rows.append({"block_size": b, "width": be.width, **r})
    return rows


def markdown(report: dict) -> str:
    lines = []
    if report.get("curve"):
        lines += _curve_markdown(report)
    if report.get("demo"):
        lines += _demo_markdown(report)
    return "\n".join(lines) + "\n"


def _curve_markdown(report: dict) -> list[str]:
    c = report["curve"]
    lines = [f"Step-cost curve: {c['preset']}-shaped random model, {c['dtype']}, torch "
             f"{'under CUDA graphs' if c['cuda_graphs'] else 'eager (CPU check, not a measurement)'}, "
             f"cache {c['max_len']} slots at L = {c['cache_len']}, median of {c['iters']} replays; {report['device']}.",
             "", "| b | proposals | width | ms p50 | ms min | cost / cost(1) |", "|---|---|---|---|---|---|"]
    for p in c["points"]:
        rs = "-" if not p["proposals"] else ("1.." + str(p["block_size"]) if p["proposals"] == list(
            range(1, p["block_size"] + 1)) else ",".join(map(str, p["proposals"])))
        lines.append(f"| {p['block_size'] if p['width'] > 1 else 'AR'} | {rs} | {p['width']} | {p['ms_p50']:.4f} | "
                     f"{p['ms_min']:.4f} | {p['cost_ratio']:.2f} |")
    return lines


def _demo_markdown(report: dict) -> list[str]:
    how = "CUDA graphs" if report["cuda_graphs"] else "eager CPU check, not a measurement"
    lines = ["", f"Demo model, AR vs TiDAR (torch, {how}, batch 1, greedy):", "",
             "| b | width | AR tokens/s | TiDAR tokens/s | speedup median [min, max] | T/NFE | conversion | equal to AR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["demo"]:
        sp, tpf = r["speedup"], r["tidar"]["tokens_per_forward"]
        lines.append(f"| {r['block_size']} | {r['width']} | {r['ar']['tokens_per_s']['median']:.1f} | "
                     f"{r['tidar']['tokens_per_s']['median']:.1f} | {sp['median']:.2f} [{sp['min']:.2f}, "
                     f"{sp['max']:.2f}] | {tpf:.2f} | {sp['median'] / tpf:.2f} | {'yes' if r['equal_to_ar'] else 'NO'} |")
    return lines


def main() -> int:
    from tidar_export.bench.measure import DEFAULT_SPARSE, block_size_range

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-len", type=int, default=2048, help="KV cache slots")
    p.add_argument("--block-sizes", type=block_size_range, default=list(range(2, 17)))
    p.add_argument("--sparse", action="append", help=f"B:R,R,.. (default {' '.join(DEFAULT_SPARSE)})")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--skip-demo", action="store_true", help="only the step-cost curve")
    p.add_argument("--demo-only", action="store_true", help="only the demo model's AR vs TiDAR")
    p.add_argument("--demo-checkpoint", help="default: the embedded demo model")
    p.add_argument("--demo-block-sizes", type=block_size_range, help="default: the checkpoint's block size")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--allow-cpu", action="store_true", help="run eagerly on the CPU when there is no CUDA (a check)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--markdown")
    args = p.parse_args()
    args.sparse = args.sparse or list(DEFAULT_SPARSE)
    import torch

    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name(0)
    elif args.allow_cpu:
        device, name = "cpu", "CPU (eager check, no CUDA graphs)"
    else:
        print("skipped: CUDA is not available (torch.cuda.is_available() is False); this benchmark measures "
              "the torch backend under CUDA graphs on a GPU (--allow-cpu runs an eager CPU check)", file=sys.stderr)
        return 0
    if args.skip_demo and args.demo_only:
        p.error("--skip-demo and --demo-only leave nothing to run")
    report = {"device": name, "torch": torch.__version__, "cuda_graphs": device == "cuda"}
    if not args.demo_only:
        report["curve"] = step_cost_curve(args, device)
    if not args.skip_demo:
        report["demo"] = demo_decode(args, device)
    text = markdown(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
