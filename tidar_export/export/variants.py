"""Artifacts of other block sizes / proposal sets, exported from an artifact's checkpoint.

The block size and the proposal set are baked into an artifact's step (and prefill) graph, but
the draft length can change at decode time without retraining (docs/ALGORITHM.md section 1). So `bench`
(step-cost curve) and `tune` (block-size search) export one complete artifact per candidate
from the same checkpoint, with every other option copied from the base artifact's manifest
(target, precision, max_seq_len, max_batch, mask token), into a work directory:

    WORKDIR/b4-r1-2-3-4/          an artifact (manifest.json, prefill/step/ar_step.onnx, ...)
    WORKDIR/b4-r1-2-3-4.json      sidecar: the export options and the checkpoint's fingerprint

A variant is reused when its sidecar matches (same options, same checkpoint content), so a
work directory can be shared by bench and tune runs; a changed checkpoint is re-exported.
Without a work directory a temp directory is used and removed by `cleanup()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tidar_export.errors import TiDARError
from tidar_runtime import fileio
from tidar_runtime.fileio import write_atomic
from tidar_runtime.contract import step_len

def checkpoint_fingerprint(checkpoint: Path) -> str:
    """BLAKE2 digest of the checkpoint's config and weight files (names and contents)."""
    h = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in checkpoint.iterdir()
                   if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")))
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


class Variants:
    def __init__(self, checkpoint: str | os.PathLike, base_manifest, workdir: str | os.PathLike | None = None):
        from tidar_export.model.checkpoint import read_config

        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_dir():
            raise TiDARError(f"checkpoint folder not found: {self.checkpoint}")
        self.base = base_manifest
        # the model as the manifest records it (the export options and sizes live in their own sections)
        cfg = dataclasses.asdict(read_config(self.checkpoint, base_manifest.block_size, base_manifest.mask_token_id))
        ours, theirs = cfg, base_manifest.model_config()
        if ours != theirs:
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise TiDARError(f"{self.checkpoint} is not the artifact's checkpoint (model config differs in "
                             f"{', '.join(diff)})")
        self._tmp = workdir is None
        self.workdir = fileio.make_temp_dir("tidar-variants.") if workdir is None else Path(workdir)
        fileio.check_writable(self.workdir)  # before any variant is exported
        self._fingerprint: str | None = None

    def options(self, block_size: int, proposals) -> dict:
        """The base artifact's recorded export options, with this block size and proposal set."""
        m = self.base
        return {"block_size": block_size, "proposals": list(proposals), "target": m.target,
                "precision": m.precision, "max_seq_len": m.max_seq_len, "max_batch": m.max_batch,
                "mask_token_id": m.mask_token_id, "ar_step": m.export["ar_step"]}

    def get(self, block_size: int, proposals, progress=None) -> Path:
        """The artifact directory of this variant, exported now unless a matching one exists."""
        from tidar_export.export.artifact import export_artifact

        if self._fingerprint is None:
            self._fingerprint = checkpoint_fingerprint(self.checkpoint)
        name = f"b{block_size}-r{'-'.join(str(r) for r in proposals)}"
        out, sidecar = self.workdir / name, self.workdir / f"{name}.json"
        want = {"options": self.options(block_size, proposals), "checkpoint": self._fingerprint}
        if sidecar.is_file() and (out / "manifest.json").is_file():
            try:
                if json.loads(sidecar.read_text()) == want:
                    return out
            except ValueError:
                pass  # a damaged sidecar: export again, which rewrites it
        t0 = time.perf_counter()
        if progress:
            progress(f"exporting variant {name} (width {step_len(block_size, proposals)})")
        opts = want["options"]
        export_artifact(self.checkpoint, out, block_size=block_size, proposals=opts["proposals"],
                        target=opts["target"], precision=opts["precision"], max_seq_len=opts["max_seq_len"],
                        max_batch=opts["max_batch"], mask_token_id=opts["mask_token_id"], ar_step=opts["ar_step"])
        write_atomic(sidecar, json.dumps(want, indent=2) + "\n")
        if progress:
            progress(f"exported {name} in {time.perf_counter() - t0:.1f}s")
        return out

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self.workdir, ignore_errors=True)
