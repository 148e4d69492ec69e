"""The embedded demo model: a small TiDAR model trained by `tidar-export train` on the Python
standard library's own source (see demo_model/MODEL_CARD.md and docs/TRAINING.md), and
`tidar-export demo`, the README's main job on it.

`tidar-export demo` exports the demo model to an ONNX artifact in a cache directory (reused
while it matches the shipped checkpoint and the decode setting), decodes a few built-in Python
prompts in AR and in TiDAR mode over ONNX Runtime, shows both outputs, checks that they are
equal token for token, and reports TiDAR's tokens per forward and its speed relative to AR.

The decode setting (block size b and proposal set) is the one shipped with the model in
`demo_model/demo_setting.json`: the fastest of a `tidar-export tune` sweep on the reference
CPU (its figures are recorded there). `--block-size` / `--proposals` override it. A step of
width w costs more than the AR step wherever the device is not idle at width 1 (a CPU: the
step is compute-bound), so the demo also prints the measured cost of the chosen width over the
AR step next to T/NFE: TiDAR is faster only while T/NFE exceeds that cost.

Exit status 1 when an output differs. Progress goes to stderr, results to stdout (`--json`:
one object).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from tidar_export.errors import TiDARError, first_line
from tidar_runtime.fileio import write_atomic

DEMO_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
)
EXPORT_OPTIONS = {"target": "ort", "precision": "fp32", "max_batch": 1}  # max_seq_len: the checkpoint's limit
STAMP_FILE = "demo.json"  # beside the manifest: which checkpoint the cached artifact was exported from
SETTING_FILE = "demo_setting.json"  # in demo_model/: the decode setting (b, proposals) to use, and why
DEFAULT_REPEATS = 3


def demo_model_path() -> Path:
    """Folder of the shipped demo checkpoint (config.json, model.safetensors, tokenizer.json)."""
    return Path(__file__).resolve().parent.parent / "demo_model"


def default_artifact_dir() -> Path:
    """$XDG_CACHE_HOME/tidar-export/demo, else ~/.cache/tidar-export/demo."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tidar-export" / "demo"


def demo_setting(checkpoint: Path | None = None) -> dict:
    """{"block_size", "proposals", "source"}: the shipped setting, else the checkpoint's b, dense."""
    from tidar_export.model.checkpoint import read_config
    from tidar_runtime.contract import normalize_proposals

    checkpoint = checkpoint or demo_model_path()
    f = checkpoint / SETTING_FILE
    if f.is_file():
        try:
            rec = json.loads(f.read_text())
            b = int(rec["block_size"])
            rs = list(normalize_proposals(b, rec.get("proposals")))
        except (OSError, ValueError, KeyError, TypeError, TiDARError) as e:
            raise TiDARError(f"{f}: unreadable decode setting ({first_line(e)})") from None
        mode = rec.get("mode", "tidar")  # "ar": tuning found no TiDAR setting faster than AR here
        return {"block_size": b, "proposals": rs, "source": SETTING_FILE, "mode": mode}
    b = read_config(checkpoint).block_size
    return {"block_size": b, "proposals": list(normalize_proposals(b, None)), "source": "checkpoint default"}


def checkpoint_digest(checkpoint: Path) -> str:
    """BLAKE2 digest of the checkpoint's model files: a retrained demo model invalidates the cache.

    Documentation (MODEL_CARD.md, any .md) is not part of it: editing the card re-exports nothing."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.suffix != ".md"):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def stale_reason(artifact_dir: Path, checkpoint: Path, digest: str, setting: dict | None = None) -> str | None:
    """Why the artifact at `artifact_dir` cannot be reused for `setting` (None: it can)."""
    from tidar_export.model.checkpoint import read_config
    from tidar_runtime.manifest import MANIFEST_FILE, load_manifest

    if not (artifact_dir / MANIFEST_FILE).is_file():
        return "no artifact yet"
    try:
        manifest = load_manifest(artifact_dir)
        stamp = json.loads((artifact_dir / STAMP_FILE).read_text())
    except (TiDARError, OSError, ValueError) as e:
        return f"unreadable ({first_line(e)})"
    cfg = read_config(checkpoint)
    setting = setting or demo_setting(checkpoint)
    if stamp.get("checkpoint_digest") != digest:
        return "exported from another demo checkpoint"
    want = {"model": dataclasses.asdict(cfg) | {"block_size": setting["block_size"]},
            "block_size": setting["block_size"], "proposals": list(setting["proposals"]),
            "target": EXPORT_OPTIONS["target"], "precision": EXPORT_OPTIONS["precision"],
            "max_batch": EXPORT_OPTIONS["max_batch"]}
    have = {k: manifest.model_config() if k == "model" else getattr(manifest, k) for k in want}
    have["proposals"] = list(have["proposals"])
    differ = [k for k in want if want[k] != have[k]]
    return f"manifest differs ({', '.join(differ)})" if differ else None


def ensure_demo_artifact(artifact_dir: Path, log=lambda msg: None, setting: dict | None = None,
                         checkpoint: Path | None = None) -> tuple[Path, bool]:
    """The demo model's (or `checkpoint`'s) ONNX artifact at `artifact_dir` for `setting` (default:
    `demo_setting()`), exported unless a matching one is there. Returns (directory, whether it was
    exported now)."""
    from tidar_export.export.artifact import export_artifact

    checkpoint = checkpoint or demo_model_path()
    setting = setting or demo_setting(checkpoint)
    digest = checkpoint_digest(checkpoint)
    reason = stale_reason(artifact_dir, checkpoint, digest, setting)
    if reason is None:
        log(f"reusing the demo artifact in {artifact_dir}")
        return artifact_dir, False
    log(f"exporting the demo model (b = {setting['block_size']}, proposals {setting['proposals']}) to "
        f"{artifact_dir} ({reason}) ...")
    t0 = time.perf_counter()
    export_artifact(checkpoint, artifact_dir, block_size=setting["block_size"], proposals=setting["proposals"],
                    **EXPORT_OPTIONS, log=lambda m: log(f"  {m}"))
    write_atomic(artifact_dir / STAMP_FILE,
                 json.dumps({"checkpoint_digest": digest, "options": EXPORT_OPTIONS,
                             "block_size": setting["block_size"], "proposals": setting["proposals"]}, indent=2) + "\n")
    log(f"exported in {time.perf_counter() - t0:.1f}s")
    return artifact_dir, True


def _median(values) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def setting_text(b: int, proposals) -> str:
    from tidar_export.bench.report import proposal_text

    return f"b = {b}, proposals {{{proposal_text(proposals, b)}}}"


def run_demo(artifact_dir: Path, max_new_tokens: int = 64, threads: int = 0, log=lambda msg: None,
             setting: dict | None = None, repeats: int = DEFAULT_REPEATS, checkpoint: Path | None = None,
             name: str = "demo_model") -> dict:
    """Decode the built-in prompts in AR and TiDAR mode over ONNX Runtime; a JSON-ready report.

    Every prompt is decoded `repeats` times in each mode, AR and TiDAR back to back with the order
    alternating, so that a load change on the machine hits both; every decode must equal AR, and
    the speed figures pool all repeats.
    """
    from tidar_runtime.tokenizer import artifact_tokenizer, default_stop_tokens
    from tidar_runtime import generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend
    from tidar_runtime.contract import step_len
    from tidar_runtime.stats import summarize, tokens_per_s

    setting = setting or demo_setting(checkpoint)
    artifact_dir, exported = ensure_demo_artifact(artifact_dir, log, setting, checkpoint)
    backend = OrtBackend(artifact_dir, intra_op_threads=threads)
    m = backend.manifest
    tok = artifact_tokenizer(artifact_dir, m)
    if tok is None:
        raise TiDARError(f"{artifact_dir}: the demo artifact has no tokenizer.json")
    stop = list(default_stop_tokens(m))
    warm = tok.encode(DEMO_PROMPTS[0]).ids
    generate_ar(backend, warm, 4, stop_tokens=stop)  # sessions and first-run allocations, not timed
    generate_tidar(backend, warm, 4, stop_tokens=stop)
    rows, ar_all, td_all = [], [], []
    for n, text in enumerate(DEMO_PROMPTS, 1):
        ids = tok.encode(text).ids
        ars, tds = [], []
        for rep in range(max(1, repeats)):
            if (n + rep) % 2:
                ars.append(generate_ar(backend, ids, max_new_tokens, stop_tokens=stop))
                tds.append(generate_tidar(backend, ids, max_new_tokens, stop_tokens=stop))
            else:
                tds.append(generate_tidar(backend, ids, max_new_tokens, stop_tokens=stop))
                ars.append(generate_ar(backend, ids, max_new_tokens, stop_tokens=stop))
        ar, td = ars[0], tds[0]
        ar_all += ars
        td_all += tds
        equal = all(a.tokens == ar.tokens for a in ars) and all(t.tokens == ar.tokens for t in tds)
        s_td = summarize(td)
        r_ar, r_td = tokens_per_s(ars), tokens_per_s(tds)
        rows.append({
            "prompt": text, "ar_text": tok.decode(ar.tokens), "tidar_text": tok.decode(td.tokens),
            "equal": equal, "ar_token_ids": ar.tokens, "tidar_token_ids": td.tokens,
            "new_tokens": len(td.tokens), "finish_reason": td.finish_reason,
            "tokens_per_forward": s_td["tokens_per_forward"], "accepted_histogram": s_td["accepted_histogram"],
            "ar_tokens_per_s": None if r_ar is None else round(r_ar, 1),
            "tidar_tokens_per_s": None if r_td is None else round(r_td, 1),
        })
        log(f"prompt {n}/{len(DEMO_PROMPTS)}: {len(td.tokens)} tokens, equal: {rows[-1]['equal']}, "
            f"TiDAR {s_td['tokens_per_forward']} tokens/forward")
    forwards = sum(r.stats.forwards for r in td_all)
    ar_rate, td_rate = tokens_per_s(ar_all), tokens_per_s(td_all)
    t_nfe = sum(sum(r.stats.accepted) for r in td_all) / max(1, forwards)
    step_s = _median([t for r in td_all for t in r.stats.step_s])
    ar_step_s = _median([t for r in ar_all for t in r.stats.step_s])
    cost = step_s / ar_step_s if step_s and ar_step_s else None
    return {
        "model": {"name": name, "arch": m.model["arch"], "block_size": m.block_size,
                  "vocab_size": m.vocab_size, "num_layers": m.num_layers},
        "setting": {"block_size": m.block_size, "proposals": list(m.proposals),
                    "width": step_len(m.block_size, m.proposals), "source": setting.get("source"),
                    "mode": setting.get("mode", "tidar")},
        "adapter": m.adapter or None,
        "artifact": str(artifact_dir), "exported": exported, "backend": "ort (CPUExecutionProvider)",
        "max_new_tokens": max_new_tokens, "repeats": max(1, repeats),
        "prompts": rows,
        "all_equal": all(r["equal"] for r in rows),
        "tokens_per_forward": round(t_nfe, 3),
        "ar_tokens_per_s": None if ar_rate is None else round(ar_rate, 1),
        "tidar_tokens_per_s": None if td_rate is None else round(td_rate, 1),
        "speed_ratio": None if not (ar_rate and td_rate) else round(td_rate / ar_rate, 3),
        # the step-cost arithmetic: median forward latency of each mode, pooled over all decodes
        "step_ms_p50": None if step_s is None else round(step_s * 1e3, 3),
        "ar_step_ms_p50": None if ar_step_s is None else round(ar_step_s * 1e3, 3),
        "step_cost_ratio": None if cost is None else round(cost, 3),
        "projected_speedup": None if cost is None else round(t_nfe / cost, 3),
    }


def cost_line(report: dict) -> str:
    """Where this machine's step cost stops being free: cost(width) / cost(1) against T/NFE."""
    st, cost, t_nfe = report["setting"], report["step_cost_ratio"], report["tokens_per_forward"]
    if cost is None:
        return "step cost: not measured (no decode steps ran)"
    verdict = "TiDAR wins here" if t_nfe > cost else "TiDAR loses here"
    return (f"step cost here: a width-{st['width']} step ({setting_text(st['block_size'], st['proposals'])}) "
            f"costs {cost:.2f}x the AR step ({report['step_ms_p50']} / {report['ar_step_ms_p50']} ms): "
            f"{verdict} while T/NFE {t_nfe:.2f} {'>' if t_nfe > cost else '<='} {cost:.2f}; projected "
            f"T/NFE x cost(1)/cost({st['width']}) = {report['projected_speedup']:.2f}x, measured "
            f"{report['speed_ratio']}x")
