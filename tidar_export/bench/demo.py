"""The embedded demo model: a small TiDAR model trained by `tidar-export train` on the Python
standard library's own source (see demo_model/MODEL_CARD.md and docs/TRAINING.md), and
`tidar-export demo`, the README's main job on it.

`tidar-export demo` exports the demo model to an ONNX artifact in a cache directory (reused
while it matches the shipped checkpoint), decodes a few built-in Python prompts in AR and in
TiDAR mode over ONNX Runtime, shows both outputs, checks that they are equal token for token,
and reports TiDAR's tokens per forward and its speed relative to AR. Exit status 1 when an
output differs. Progress goes to stderr, results to stdout (`--json`: one object).
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


def demo_model_path() -> Path:
    """Folder of the shipped demo checkpoint (config.json, model.safetensors, tokenizer.json)."""
    return Path(__file__).resolve().parent.parent / "demo_model"


def default_artifact_dir() -> Path:
    """$XDG_CACHE_HOME/tidar-export/demo, else ~/.cache/tidar-export/demo."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tidar-export" / "demo"


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


def stale_reason(artifact_dir: Path, checkpoint: Path, digest: str) -> str | None:
    """Why the artifact at `artifact_dir` cannot be reused (None: it can)."""
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
    if stamp.get("checkpoint_digest") != digest:
        return "exported from another demo checkpoint"
    want = {"model": dataclasses.asdict(cfg), "block_size": cfg.block_size, "target": EXPORT_OPTIONS["target"],
            "precision": EXPORT_OPTIONS["precision"], "max_batch": EXPORT_OPTIONS["max_batch"]}
    have = {k: getattr(manifest, k) for k in want}
    differ = [k for k in want if want[k] != have[k]]
    return f"manifest differs ({', '.join(differ)})" if differ else None


def ensure_demo_artifact(artifact_dir: Path, log=lambda msg: None) -> tuple[Path, bool]:
    """The demo model's ONNX artifact at `artifact_dir`, exported unless a matching one is there.
    Returns (directory, whether it was exported now)."""
    from tidar_export.export.artifact import export_artifact

    checkpoint = demo_model_path()
    digest = checkpoint_digest(checkpoint)
    reason = stale_reason(artifact_dir, checkpoint, digest)
    if reason is None:
        log(f"reusing the demo artifact in {artifact_dir}")
        return artifact_dir, False
    log(f"exporting the demo model to {artifact_dir} ({reason}) ...")
    t0 = time.perf_counter()
    export_artifact(checkpoint, artifact_dir, **EXPORT_OPTIONS, log=lambda m: log(f"  {m}"))
    write_atomic(artifact_dir / STAMP_FILE,
                 json.dumps({"checkpoint_digest": digest, "options": EXPORT_OPTIONS}, indent=2) + "\n")
    log(f"exported in {time.perf_counter() - t0:.1f}s")
    return artifact_dir, True


def run_demo(artifact_dir: Path, max_new_tokens: int = 64, threads: int = 0, log=lambda msg: None) -> dict:
    """Decode the built-in prompts in AR and TiDAR mode over ONNX Runtime; a JSON-ready report."""
    from tidar_runtime.tokenizer import folder_tokenizer
    from tidar_runtime import generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend
    from tidar_runtime.stats import summarize, tokens_per_s

    artifact_dir, exported = ensure_demo_artifact(artifact_dir, log)
    backend = OrtBackend(artifact_dir, intra_op_threads=threads)
    m = backend.manifest
    tok = folder_tokenizer(artifact_dir)
    if tok is None:
        raise TiDARError(f"{artifact_dir}: the demo artifact has no tokenizer.json")
    eos = m.tokenizer.get("eos_token_id")
    stop = [eos] if eos is not None else []
    warm = tok.encode(DEMO_PROMPTS[0]).ids
    generate_ar(backend, warm, 4, stop_tokens=stop)  # sessions and first-run allocations, not timed
    generate_tidar(backend, warm, 4, stop_tokens=stop)
    rows, ar_all, td_all = [], [], []
    for n, text in enumerate(DEMO_PROMPTS, 1):
        ids = tok.encode(text).ids
        ar = generate_ar(backend, ids, max_new_tokens, stop_tokens=stop)
        td = generate_tidar(backend, ids, max_new_tokens, stop_tokens=stop)
        ar_all.append(ar)
        td_all.append(td)
        s_ar, s_td = summarize(ar), summarize(td)
        rows.append({
            "prompt": text, "ar_text": tok.decode(ar.tokens), "tidar_text": tok.decode(td.tokens),
            "equal": ar.tokens == td.tokens, "ar_token_ids": ar.tokens, "tidar_token_ids": td.tokens,
            "new_tokens": len(td.tokens), "finish_reason": td.finish_reason,
            "tokens_per_forward": s_td["tokens_per_forward"], "accepted_histogram": s_td["accepted_histogram"],
            "ar_tokens_per_s": s_ar["tokens_per_s"], "tidar_tokens_per_s": s_td["tokens_per_s"],
        })
        log(f"prompt {n}/{len(DEMO_PROMPTS)}: {len(td.tokens)} tokens, equal: {rows[-1]['equal']}, "
            f"TiDAR {s_td['tokens_per_forward']} tokens/forward")
    forwards = sum(r.stats.forwards for r in td_all)
    ar_rate, td_rate = tokens_per_s(ar_all), tokens_per_s(td_all)
    return {
        "model": {"name": "demo_model", "arch": m.model["arch"], "block_size": m.block_size,
                  "vocab_size": m.model["vocab_size"], "num_layers": m.model["num_layers"]},
        "artifact": str(artifact_dir), "exported": exported, "backend": "ort (CPUExecutionProvider)",
        "max_new_tokens": max_new_tokens,
        "prompts": rows,
        "all_equal": all(r["equal"] for r in rows),
        "tokens_per_forward": round(sum(sum(r.stats.accepted) for r in td_all) / max(1, forwards), 3),
        "ar_tokens_per_s": None if ar_rate is None else round(ar_rate, 1),
        "tidar_tokens_per_s": None if td_rate is None else round(td_rate, 1),
        "speed_ratio": None if not (ar_rate and td_rate) else round(td_rate / ar_rate, 3),
    }
