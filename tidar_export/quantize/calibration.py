"""Calibration: the prompt file, and the real inputs of every graph recorded from greedy TiDAR and AR
decodes of the prompts on the float artifact (a reservoir keeps at most `samples` per graph).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_runtime.contract import CACHE_LEN, GRAPH_KINDS, INPUT_IDS, ids_input
from tidar_runtime.manifest import Manifest

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration" / "prompts.txt"
PROMPT_SEPARATOR = "# %%"  # a line of its own before each prompt of a calibration text file
# How much decoding calibration does by default: the first 16 prompts, 32 new tokens per decode
# (in both modes), of which at most 64 inputs per graph are kept. Measured on SmolLM2-135M
# (docs/QUANTIZATION.md): the old 40 prompts x 48 tokens took over 20 minutes on a busy 2-core
# machine for the same 64 kept inputs.
DEFAULT_CALIBRATION_PROMPTS, DEFAULT_CALIBRATION_NEW_TOKENS, DEFAULT_SAMPLES = 16, 32, 64


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a calibration text file: each follows a line holding only `# %%`."""
    path = Path(path)
    if not path.is_file():
        raise TiDARError(f"calibration prompt file not found: {path}")
    prompts, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == PROMPT_SEPARATOR:
            if current is not None and "".join(current).strip():
                prompts.append("\n".join(current).strip("\n") + "\n")
            current = []
        elif current is not None:
            current.append(line)
    if current is not None and "".join(current).strip():
        prompts.append("\n".join(current).strip("\n") + "\n")
    if not prompts:
        raise TiDARError(f"{path}: no prompts (each prompt follows a line holding only {PROMPT_SEPARATOR!r})")
    return prompts


def tokenize_prompts(artifact_dir: Path, manifest: Manifest, texts: Sequence[str]) -> list[list[int]]:
    from tidar_export.train.data import load_tokenizer

    file = manifest.tokenizer.get("file")
    if not file:
        raise TiDARError(f"{artifact_dir} has no tokenizer: calibrate it with token-id prompts "
                         "(quantize_artifact(..., prompts=[[ids], ...]))")
    tok = load_tokenizer(artifact_dir / file)
    return [enc.ids for enc in tok.encode_batch(list(texts), add_special_tokens=False)]


class _Reservoir:
    """At most `size` items, a uniform sample of everything offered (Algorithm R, seeded)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.items, self.seen = size, rng, [], 0

    def offer(self, make: Callable[[], dict]) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(make())
            return
        j = int(self.rng.integers(0, self.seen))
        if j < self.size:
            self.items[j] = make()  # `make` copies the cache only when the sample is kept


class RecordingBackend:
    """Wraps an OrtBackend; records the inputs of every graph pass for calibration.

    The step graphs' inputs include the KV cache as it stood before the pass (the backend's
    `cache` arrays), so the calibration sees realistic caches, not random ones.
    """

    def __init__(self, backend, samples: int, seed: int = 0):
        self.backend = backend
        rng = np.random.default_rng(seed)
        self.records = {kind: _Reservoir(samples, rng) for kind in GRAPH_KINDS}

    def __getattr__(self, name):  # block_size, proposals, max_len, max_batch, mask_token_id
        return getattr(self.backend, name)

    def _cached(self, kind: str, feeds: dict) -> None:
        past = dict(zip(self.backend.past_names, self.backend.cache))
        used = int(np.max(feeds[CACHE_LEN])) + self.backend.manifest.step_len  # slots a pass can see
        # the used slots only (a kept sample of a 512-slot cache would otherwise copy it whole);
        # `full_feed` pads them back with zeros, which the pass cannot see
        self.records[kind].offer(lambda: {**{k: np.array(v) for k, v in feeds.items()},
                                          **{k: v[:, :, :used].copy() for k, v in past.items()}})

    def _prompt(self, prompt) -> None:
        self.records["prefill"].offer(lambda: {INPUT_IDS: np.asarray(prompt, np.int64)[None].copy()})

    def prefill(self, row, prompt, want_logits):
        self._prompt(prompt)
        return self.backend.prefill(row, prompt, want_logits)

    def ar_prefill(self, row, prompt, want_logits):
        self._prompt(prompt)
        return self.backend.ar_prefill(row, prompt, want_logits)

    def step(self, drafts, cache_len, want_logits):
        self._cached("step", {ids_input("step"): drafts, CACHE_LEN: cache_len})
        return self.backend.step(drafts, cache_len, want_logits)

    def ar_step(self, tokens, cache_len, want_logits):
        self._cached("ar_step", {ids_input("ar_step"): tokens, CACHE_LEN: cache_len})
        return self.backend.ar_step(tokens, cache_len, want_logits)


def full_feed(feed: dict, session) -> dict:
    """A recorded feed as `session` takes it: cache inputs zero-padded back to their static slot count."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    out = {}
    for name, value in feed.items():
        shape = shapes.get(name)
        if shape is not None and value.ndim == 4 and isinstance(shape[2], int) and value.shape[2] < shape[2]:
            value = np.pad(value, ((0, 0), (0, 0), (0, shape[2] - value.shape[2]), (0, 0)))
        out[name] = value
    return out


def fit_prompts(prompts: Sequence[Sequence[int]], manifest: Manifest, max_new_tokens: int) -> list[list[int]]:
    """Prompts cut (from the left) so that prefill, `max_new_tokens` and one step fit the cache."""
    room = manifest.max_seq_len - manifest.step_len - max_new_tokens
    if room < 1:
        raise TiDARError(f"max_seq_len {manifest.max_seq_len} leaves no room for a prompt with "
                         f"{max_new_tokens} new tokens and a step of {manifest.step_len}")
    out = [list(map(int, p))[-room:] for p in prompts if len(p)]
    if not out:
        raise TiDARError("no non-empty calibration prompt")
    return out


def collect_calibration_inputs(artifact_dir: Path, prompts: Sequence[Sequence[int]], *, samples: int = DEFAULT_SAMPLES,
                               max_new_tokens: int = DEFAULT_CALIBRATION_NEW_TOKENS, seed: int = 0,
                               log=None) -> dict[str, list[dict]]:
    """Real inputs of every graph, from greedy TiDAR and AR decodes of `prompts` on the artifact."""
    from tidar_runtime import SamplingParams, generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    log = log or (lambda msg: None)
    backend = OrtBackend(artifact_dir)
    manifest = backend.manifest
    recorder = RecordingBackend(backend, samples, seed)
    prompts = fit_prompts(prompts, manifest, max_new_tokens)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generate_tidar(recorder, prompt, max_new_tokens, SamplingParams())
        generate_ar(recorder, prompt, max_new_tokens, SamplingParams())
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):
            log(f"calibration decodes: {i + 1}/{len(prompts)} prompts ({time.perf_counter() - t0:.1f}s)")
    return {kind: r.items for kind, r in recorder.records.items()}
