"""The TiDAR training recipe (docs/ALGORITHM.md section 2) and its AR-only baseline: `tidar-export train`.

TiDAR mode, one forward per batch over 2S tokens, no cache:

    ids        [x_0 .. x_{S-1} | M x S]          masks.train_mask(S, b), masks.train_positions(S)
    labels     [x_1 .. x_S     | x_0 .. x_{S-1}]  clean i -> x_{i+1} (shifted), mask j -> x_j (not)
    loss       1/(1+a) * (a * mean CE_AR + mean CE_diff)

Every token of the second half is the mask token ("full mask", no noise schedule). AR mode is
the baseline: plain causal next-token loss over the S clean tokens, same model, data and steps.

A run folder is a checkpoint folder (config.json, model.safetensors, tokenizer files: what
`load_checkpoint` and transformers read) plus the resume state this module owns:
`train_state.json` (step, settings, history) and `train_state.safetensors` (AdamW moments).
The recipe keeps no RNG state: the init draws from its own seeded generator, the batch of step
t is a pure function of (seed, t), and there is no dropout; so that state is complete. Both are
written into a staging folder that replaces the run folder by rename, so an interrupted save
leaves the previous state intact. Nothing is ever unpickled.

torch is imported inside the functions, so that registering the subcommand costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tidar_export.train import data
from tidar_export.train.rollout import make_rollout_pool, rollout_batch  # noqa: F401 (the trainer's rollout target)
from tidar_export.errors import TiDARError
from tidar_runtime import fileio

if TYPE_CHECKING:
    import torch

    from tidar_export.model.transformer import TiDARModel

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
MODES = ("tidar", "ar")
DRAFT_TARGETS = ("data", "self", "soft", "rollout")


@dataclass(frozen=True)
class TrainSettings:
    mode: str = "tidar"  # "tidar" (docs/ALGORITHM.md section 2) or "ar" (next-token loss only, the baseline)
    corpus: str = "stdlib"  # "stdlib" or a folder of text files
    pattern: str = "*.py"  # file glob inside the corpus folder
    # model shape (fresh runs; a run continued from --init-from keeps that checkpoint's shape)
    arch: str = "llama"  # llama: no biases, no q/k norm
    vocab_size: int = 4096  # BPE vocabulary, special tokens included
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    # objective and data
    seq_len: int = 256  # S: clean tokens per sequence (the forward sees 2S in TiDAR mode)
    block_size: int = 8  # b: training block size, recorded as the checkpoint's default
    ar_weight: float = 1.0  # a in 1/(1+a) * (a * CE_AR + CE_diff)
    batch_size: int = 16  # sequences per step
    # optimisation: AdamW, linear warm-up then cosine decay to lr * min_lr_ratio
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0
    seed: int = 0  # model init and the per-step batch sampler
    init_from: str | None = None  # continue from this (imported AR) checkpoint instead of scratch
    # what the mask slots learn (TiDAR mode): "data" (x_j), "self" (the AR head's own argmax at
    # j-1 from the same forward, detached), "soft" (that row's whole distribution: cross-entropy
    # against the detached softmax, i.e. KL up to a constant) or "rollout" ("self" on a batch whose first
    # rollout_frac rows continue a real prefix with the model's own greedy tokens)
    draft_target: str = "data"
    rollout_frac: float = 0.5  # share of each batch's rows taken from the rollout pool
    rollout_every: int = 20  # steps between regenerations of the pool by the current model
    rollout_pool: int = 32  # rows in the pool
    rollout_prefix_min: int = 8  # real prefix length P of a rollout row: uniform in [min, max]
    rollout_prefix_max: int = 96
    # draft adapter (tidar_export.model.adapter): rank > 0 freezes the --init-from model and trains
    # low-rank updates that act on the mask rows only (its greedy output stays the base model's)
    adapter_rank: int = 0  # 0: the full-weight recipe
    adapter_layers: str = "all"  # "all", "topN", "A-B" or "i,j,k"
    adapter_projections: str = "all"  # "all", "none" (the embedding offset alone) or "q,k,v,o,gate,up,down"
    adapter_alpha: float = 0.0  # updates scaled by alpha / rank; 0 means alpha = rank (scale 1)
    adapter_embed: bool = True  # also learn an offset added to the mask rows at the first adapted layer

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TiDARError(f"unknown training mode {self.mode!r}: choose tidar or ar")
        for name in ("seq_len", "block_size", "batch_size", "steps", "vocab_size", "hidden_size",
                     "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise TiDARError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len % self.block_size:
            raise TiDARError(f"--seq-len {self.seq_len} must be a multiple of --block-size {self.block_size}")
        if self.lr <= 0 or self.ar_weight < 0 or self.warmup < 0:
            raise TiDARError("--lr must be > 0, --ar-weight and --warmup >= 0")
        if self.draft_target not in DRAFT_TARGETS:
            raise TiDARError(f"unknown --draft-target {self.draft_target!r}: choose {', '.join(DRAFT_TARGETS)}")
        if self.draft_target != "data" and self.mode != "tidar":
            raise TiDARError(f"--draft-target {self.draft_target} needs --mode tidar (AR mode has no mask slots)")
        if self.draft_target == "rollout":
            if not 0 < self.rollout_frac <= 1 or self.rollout_every < 1 or self.rollout_pool < 1:
                raise TiDARError("--rollout-frac must lie in (0, 1], --rollout-every and --rollout-pool >= 1")
            if not 1 <= self.rollout_prefix_min <= self.rollout_prefix_max < self.seq_len:
                raise TiDARError(f"rollout prefix lengths must satisfy 1 <= --rollout-prefix-min <= "
                                 f"--rollout-prefix-max < --seq-len {self.seq_len}")

        if self.adapter_rank < 0:
            raise TiDARError(f"--adapter-rank must be >= 0, got {self.adapter_rank}")
        if self.adapter_rank and (self.init_from is None or self.mode != "tidar"):
            raise TiDARError("--adapter-rank trains a draft adapter for an existing model: it needs --init-from "
                             "CHECKPOINT and --mode tidar")
        self.adapter_config(None)  # its fields checked now, before any file is read (the layers need the model)

    def adapter_config(self, num_layers: int | None):
        """The AdapterConfig of an adapter run (None for the full-weight recipe). num_layers None:
        the layers are left unparsed (all), for checking the other fields before the model is loaded."""
        if not self.adapter_rank:
            return None
        # imported here: the CLI builds a default TrainSettings in installs without torch
        from tidar_export.model.adapter import AdapterConfig, parse_layers, parse_projections

        layers = () if num_layers is None else parse_layers(self.adapter_layers, num_layers)
        return AdapterConfig(rank=self.adapter_rank, layers=layers,
                             alpha=self.adapter_alpha or float(self.adapter_rank), embed_offset=self.adapter_embed,
                             projections=parse_projections(self.adapter_projections))

    def rollout_rows(self) -> int:
        """Rows of each batch that come from the rollout pool (0 unless draft_target is rollout)."""
        if self.draft_target != "rollout":
            return 0
        return max(1, min(self.batch_size, round(self.rollout_frac * self.batch_size)))

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# Settings that may differ when a run is resumed; everything else must match the saved run.
RESUMABLE_CHANGES = ("steps",)


# ---------------------------------------------------------------------------------------------
# The objective


def tidar_batch(x: torch.Tensor, block_size: int, mask_token_id: int):
    """TiDAR training batch from windows x [B, S+1] (docs/ALGORITHM.md section 2).

    Returns ids [B, 2S], positions [B, 2S], mask [2S, 2S] (True = may attend), labels [B, 2S].
    """
    import torch

    from tidar_export.model import masks

    B, S = x.shape[0], x.shape[1] - 1
    clean = x[:, :S]  # x_0..x_{S-1}
    ids = torch.cat([clean, torch.full_like(clean, mask_token_id)], dim=1)  # full mask: all M
    labels = torch.cat([x[:, 1:], clean], dim=1)  # clean i -> x_{i+1}; mask j -> x_j
    pos = masks.train_positions(S)[None].expand(B, -1)
    return ids, pos, masks.train_mask(S, block_size), labels


def ar_batch(x: torch.Tensor):
    """Plain causal LM batch from windows x [B, S+1]: ids [B, S], positions, causal mask, labels."""
    import torch

    from tidar_export.model import masks

    B, S = x.shape[0], x.shape[1] - 1
    pos = torch.arange(S)[None].expand(B, -1)
    return x[:, :S], pos, masks.causal_mask(S), x[:, 1:]


def self_targets(clean_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mask-slot labels [B, S] of the "self" target: slot j learns argmax(AR logits at j-1), detached.

    That is the token greedy verification compares draft j with (when the clean prefix is the
    decode's context). Slot 0 has no AR row before it and keeps the data label x_0.
    """
    import torch

    with torch.no_grad():
        ar_argmax = clean_logits.argmax(-1)  # [B, S]: row i predicts position i + 1
    return torch.cat([x[:, :1], ar_argmax[:, :-1]], dim=1)


def soft_targets(clean_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mask-slot targets [B, S, V] of the "soft" target: slot j learns softmax(AR logits at j-1), detached.

    The distribution whose argmax is the `self` label, so the loss (cross-entropy against it, KL
    up to the constant entropy) also teaches the runner-up tokens. Slot 0 keeps x_0, one-hot.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        probs = clean_logits.float().softmax(-1)
        first = F.one_hot(x[:, :1], probs.shape[-1]).to(probs.dtype)
        return torch.cat([first, probs[:, :-1]], dim=1)


def diffusion_targets(draft_target: str, clean_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the mask slots learn: labels [B, S] (data, self, rollout) or probabilities [B, S, V] (soft)."""
    if draft_target == "data":
        return x[:, :-1]
    if draft_target == "soft":
        return soft_targets(clean_logits, x)
    return self_targets(clean_logits, x)


def losses(model: TiDARModel, x: torch.Tensor, mode: str, block_size: int, ar_weight: float = 1.0,
           draft_target: str = "data", real_len: torch.Tensor | None = None):
    """(total, ce_ar, ce_diff) for windows x [B, S+1]; ce_diff is None in AR mode.

    draft_target: "data" (mask slot j learns x_j), "self"/"rollout" (it learns the AR head's
    argmax at j-1 of the same forward, `self_targets`) or "soft" (that row's distribution,
    `soft_targets`). real_len [B]: number of real (corpus)
    tokens at the start of each window, the rest being generated (rollout rows); the AR term
    skips the labels that are generated tokens. None: all real.
    """
    import torch
    import torch.nn.functional as F

    S = x.shape[1] - 1
    if mode == "ar":
        ids, pos, mask, labels = ar_batch(x)
        logits, _, _ = model(ids, pos, mask)  # [B, S, V]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return ce, ce, None
    ids, pos, mask, labels = tidar_batch(x, block_size, model.cfg.mask_token_id)
    logits, _, _ = model(ids, pos, mask)  # [B, 2S, V]
    ar_labels = labels[:, :S]
    if real_len is not None:
        generated = torch.arange(1, S + 1)[None] >= real_len[:, None]  # label i is token x_{i+1}
        ar_labels = ar_labels.masked_fill(generated, -100)
    diff_labels = diffusion_targets(draft_target, logits[:, :S], x)
    ce_ar = F.cross_entropy(logits[:, :S].flatten(0, 1).float(), ar_labels.flatten(), ignore_index=-100)
    ce_diff = F.cross_entropy(logits[:, S:].flatten(0, 1).float(), diff_labels.flatten(0, 1))
    total = (ar_weight * ce_ar + ce_diff) / (1 + ar_weight)
    return total, ce_ar, ce_diff


def adapter_losses(model: TiDARModel, x: torch.Tensor, block_size: int, draft_target: str = "self"):
    """(total, ce_ar, ce_diff) of a draft-adapter step on windows x [B, S+1]; total = ce_diff.

    The same objective as `losses` in TiDAR mode, in two passes: the clean rows under no_grad
    (they see no adapter, so nothing of theirs needs a gradient; their logits give the `self`
    labels and ce_ar, their keys/values the context), then the S mask rows with the adapter,
    attending to those keys/values under the training mask's mask-row part. Slot 0 of each block
    is left out of the loss: decoding never uses it (the anchor is the AR row's token).
    """
    import torch
    import torch.nn.functional as F

    from tidar_export.model import masks
    from tidar_export.model.transformer import rope_cos_sin

    B, S = x.shape[0], x.shape[1] - 1
    clean = x[:, :S]
    pos = torch.arange(S)[None].expand(B, -1)
    with torch.no_grad():
        h, keys, values = model.hidden(clean, pos, masks.causal_mask(S))
        clean_logits = model.lm_head(h)
        ce_ar = F.cross_entropy(clean_logits.flatten(0, 1).float(), x[:, 1:].flatten())
        labels = diffusion_targets(draft_target, clean_logits, x)
        del clean_logits, h
    keep = torch.arange(S) % block_size != 0  # the draft slots 1..b-1 of every block
    allow = masks.train_mask(S, block_size)[S:][None, None]  # [1, 1, S, 2S]: mask rows over [clean | mask]
    hid = model.model.embed_tokens(torch.full_like(clean, model.cfg.mask_token_id))
    cos, sin = rope_cos_sin(pos, model.cfg.head_dim, model.cfg.rope_theta, hid.dtype)
    for i, layer in enumerate(model.model.layers):
        hid, _, _ = layer(hid, cos, sin, allow, keys[i], values[i], None, "slice", model.adapter.for_layer(i), S)
    logits = model.lm_head(model.model.norm(hid[:, keep]))
    ce_diff = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep].flatten(0, 1))
    return ce_diff, ce_ar, ce_diff


def batch_windows(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The windows [B, S+1] of step `step`: a pure function of (seed, step), so resuming needs no sampler state."""
    import numpy as np
    import torch

    n = stream.numel() - seq_len - 1
    rng = np.random.default_rng([seed, step])
    starts = torch.from_numpy(rng.integers(0, n + 1, size=batch_size))
    return stream[starts[:, None] + torch.arange(seq_len + 1)].long()


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def init_weights(model: TiDARModel, seed: int) -> None:
    """N(0, 0.02) matrices, zero biases, unit norms; residual output projections scaled by 1/sqrt(2 layers)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    resid_std = 0.02 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                std = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_optimizer(model: TiDARModel, s: TrainSettings) -> torch.optim.AdamW:
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # an adapter run: the adapter only
    decay = [p for _, p in named if p.dim() >= 2]
    other = [p for _, p in named if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def optimizer_tensors(opt: torch.optim.AdamW) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """AdamW moments by parameter index, and each parameter's step count."""
    tensors, steps = {}, {}
    for i, p in enumerate(_opt_params(opt)):
        st = opt.state.get(p)
        if not st:
            continue
        tensors[f"exp_avg.{i}"] = st["exp_avg"].detach().clone().contiguous()
        tensors[f"exp_avg_sq.{i}"] = st["exp_avg_sq"].detach().clone().contiguous()
        steps[str(i)] = float(st["step"])
    return tensors, steps


def load_optimizer_tensors(opt: torch.optim.AdamW, tensors: dict[str, torch.Tensor], steps: dict[str, float]) -> None:
    import torch

    for i, p in enumerate(_opt_params(opt)):
        if str(i) not in steps:
            continue
        avg, sq = tensors[f"exp_avg.{i}"], tensors[f"exp_avg_sq.{i}"]
        if avg.shape != p.shape:
            raise TiDARError(f"optimizer state {i} has shape {tuple(avg.shape)}, parameter {tuple(p.shape)}")
        opt.state[p] = {"step": torch.tensor(steps[str(i)]), "exp_avg": avg.clone(), "exp_avg_sq": sq.clone()}


# ---------------------------------------------------------------------------------------------
# The run folder


def save_run(folder: Path, model: TiDARModel, opt: torch.optim.AdamW, state: dict, tokenizer_dir: Path,
             extra: dict[str, torch.Tensor] | None = None, base: str | None = None) -> None:
    """Checkpoint (importer format) + resume state (plus `extra` tensors: the rollout pool), swapped in atomically.

    base: an adapter run's frozen checkpoint, whose weight files are linked (or copied) instead of written."""
    from safetensors.torch import save_file

    from tidar_export.model.checkpoint import write_checkpoint_files, write_adapter_checkpoint

    staging = fileio.staging_dir(folder)
    try:
        if base is None:
            write_checkpoint_files(model, staging, tokenizer_from=tokenizer_dir)
        else:
            write_adapter_checkpoint(model, staging, base, tokenizer_from=tokenizer_dir)
        tensors, steps = optimizer_tensors(opt)
        save_file(tensors | (extra or {}), str(staging / STATE_TENSORS))
        (staging / STATE_JSON).write_text(json.dumps(state | {"optimizer_steps": steps}, indent=1) + "\n")
        fileio.publish_dir(staging, folder)  # the output policy was applied when the run started
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    js, ts = folder / STATE_JSON, folder / STATE_TENSORS
    if not js.is_file() or not ts.is_file():
        raise TiDARError(f"{folder}: no training state to resume ({STATE_JSON} / {STATE_TENSORS} missing)")
    from tidar_export.model.checkpoint import check_safetensors_header

    try:
        state = json.loads(js.read_text())
        check_safetensors_header(ts)
        tensors = load_file(str(ts))
    except Exception as e:  # JSON or safetensors error: report it as a user error
        raise TiDARError(f"{folder}: unreadable training state ({type(e).__name__}: {e})") from None
    return state, tensors


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# The loop


def _fresh_model(s: TrainSettings, tok, tokenizer_vocab: int) -> TiDARModel:
    from tidar_export.model.config import TiDARConfig
    from tidar_export.model.transformer import TiDARModel

    mask_id = data.special_id(tok, data.MASK_TOKEN)
    eos_id = data.special_id(tok, data.EOS_TOKEN)
    if mask_id is None:
        raise TiDARError(f"the tokenizer has no {data.MASK_TOKEN} token: train one here (omit --tokenizer)")
    if s.hidden_size % s.num_heads:
        raise TiDARError(f"--hidden-size {s.hidden_size} is not a multiple of --heads {s.num_heads}")
    cfg = TiDARConfig(
        arch=s.arch, vocab_size=tokenizer_vocab, hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size, num_layers=s.num_layers, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, head_dim=s.hidden_size // s.num_heads, rope_theta=10000.0,
        rms_norm_eps=1e-6, max_position_embeddings=s.seq_len, attention_bias=False,
        qk_norm=s.arch == "qwen3", tie_word_embeddings=True, block_size=s.block_size,
        mask_token_id=mask_id, eos_token_id=eos_id,
    )
    model = TiDARModel(cfg)
    init_weights(model, s.seed)
    return model


def train(s: TrainSettings, out: str | os.PathLike, *, resume: bool = False, tokenizer: str | None = None,
          mask_token_id: int | None = None, stop_at: int | None = None, save_every: int = 500,
          log_every: int = 50, progress: bool = True, log=print, force: bool = False,
          cpu_budget: float | None = None) -> dict:
    """Run (or resume) a training run into the folder `out`; returns the final state dict.

    cpu_budget: save and stop once the steps have used this many seconds of CPU time (all
    threads, counted over resumes), so that runs of different cost compare at equal CPU time.
    """
    import torch
    from tidar_export.model.checkpoint import load_checkpoint

    out = Path(out)
    inputs = [p for p in (tokenizer, s.init_from) if p]
    t_setup = time.perf_counter()
    if resume:
        state, tensors = read_state(out)
        out = fileio.prepare_output(out, "run", force, inputs)  # its own run folder, writable
        saved = TrainSettings(**state["settings"])
        diff = {k for k in state["settings"] if getattr(s, k) != getattr(saved, k)} - set(RESUMABLE_CHANGES)
        if diff:
            raise TiDARError(f"--resume: {sorted(diff)[0]} differs from the saved run "
                             f"({getattr(saved, sorted(diff)[0])!r}); resume with the same settings")
        model = load_checkpoint(out)
        step = state["step"]
    else:
        out = fileio.prepare_output(out, "run", force, inputs)
        if out.exists() and not out.is_dir():
            raise TiDARError(f"output {out} exists and is not a folder")
        if out.exists() and any(out.iterdir()) and not force:
            hint = ": pass --resume to continue it" if (out / STATE_JSON).is_file() else ""
            raise TiDARError(f"output folder {out} already exists and is not empty{hint}")
        state, tensors, step = None, None, 0

    corpus = data.find_corpus(s.corpus, s.pattern)
    texts = data.read_texts(corpus.train)
    with fileio.temp_dir("tidar-tok-") as tok_tmp:
        tok_dir = Path(tok_tmp)
        if resume:
            tok_src = out
        elif tokenizer is not None:
            tok_src = Path(tokenizer)
        elif s.init_from is not None:
            tok_src = Path(s.init_from)
        else:
            tok_src = None
        if tok_src is None:
            data.train_tokenizer(texts, s.vocab_size, tok_dir / "tokenizer.json")
        else:
            src = tok_src / "tokenizer.json" if tok_src.is_dir() else tok_src
            if not src.is_file():
                raise TiDARError(f"tokenizer not found: {src} (give --tokenizer FILE)")
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                f = src if name == "tokenizer.json" else src.parent / name
                if f.is_file():
                    shutil.copy2(f, tok_dir / name)
        tok = data.load_tokenizer(tok_dir)

        if not resume:
            if s.init_from is not None:
                model = load_checkpoint(s.init_from, block_size=s.block_size, mask_token_id=mask_token_id)
                if model.cfg.vocab_size < tok.get_vocab_size():
                    raise TiDARError(f"tokenizer has {tok.get_vocab_size()} tokens, the checkpoint's vocabulary "
                                     f"only {model.cfg.vocab_size}")
            else:
                model = _fresh_model(s, tok, tok.get_vocab_size())
        acfg = s.adapter_config(model.cfg.num_layers)
        if acfg is not None:
            from tidar_export.model.adapter import attach

            if model.adapter is None:  # a fresh run (a resumed one loaded its own)
                torch.manual_seed(s.seed)
                attach(model, acfg)
            elif model.adapter.acfg != acfg:
                raise TiDARError(f"{out}: its adapter's config differs from the run settings")
            model.requires_grad_(False)
            model.adapter.requires_grad_(True)
        model.train()
        cfg = model.cfg
        eos_id = cfg.eos_ids[0] if cfg.eos_ids else data.special_id(tok, data.EOS_TOKEN)
        stream = torch.from_numpy(data.token_stream(tok, texts, eos_id))
        if stream.numel() < s.seq_len + 2:
            raise TiDARError(f"corpus has only {stream.numel()} training tokens: need more than --seq-len {s.seq_len}")
        if int(stream.max()) >= cfg.vocab_size:
            raise TiDARError(f"token id {int(stream.max())} is outside the model's vocabulary ({cfg.vocab_size})")

        opt = make_optimizer(model, s)
        if resume:
            load_optimizer_tensors(opt, tensors, state["optimizer_steps"])
            history, elapsed, tokens_seen = state["history"], state["elapsed_s"], state["tokens_seen"]
            cpu = state.get("cpu_s", 0.0)
        else:
            history, elapsed, tokens_seen, cpu = [], 0.0, 0, 0.0

        def snapshot() -> dict:
            return {"step": step, "settings": dataclasses.asdict(s), "tokens_seen": tokens_seen,
                    "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 2), "history": history,
                    "corpus": corpus.describe() | {"root": "stdlib" if s.corpus == "stdlib" else s.corpus,
                                                   "train_tokens": int(stream.numel())},
                    "model_params": cfg.num_params(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": sys.version.split()[0]}

        end = s.steps if stop_at is None else min(stop_at, s.steps)
        what = (f"draft adapter ({model.adapter.num_params() / 1e6:.2f}M params) on a frozen "
                if acfg is not None else "")
        log(f"{s.mode} training: {what}{cfg.num_params() / 1e6:.2f}M params, {stream.numel():,} train tokens "
            f"({len(corpus.train)} files, {len(corpus.heldout)} held out), S={s.seq_len} b={s.block_size} "
            f"batch={s.batch_size}, steps {step}->{end} of {s.steps}, {torch.get_num_threads()} threads, "
            f"setup {time.perf_counter() - t_setup:.1f}s")
        bar = None
        if progress and step < end:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       disable=not sys.stderr.isatty())
            log = bar.write
        acc = {"loss": 0.0, "ar": 0.0, "diff": 0.0, "n": 0}
        pool = None  # rollout pool: (windows, real_len), regenerated every rollout_every steps
        if resume and "rollout.windows" in tensors:
            pool = (tensors["rollout.windows"], tensors["rollout.real_len"])

        def extra() -> dict:
            return {} if pool is None else {"rollout.windows": pool[0].contiguous(),
                                            "rollout.real_len": pool[1].contiguous()}

        base = s.init_from if acfg is not None else None
        t_log = time.perf_counter()
        while step < end and (cpu_budget is None or cpu < cpu_budget):
            t0, c0 = time.perf_counter(), time.process_time()
            lr = s.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            x = batch_windows(stream, step, s.batch_size, s.seq_len, s.seed)
            real_len = None
            if s.draft_target == "rollout":
                if pool is None or step % s.rollout_every == 0:
                    pool = make_rollout_pool(model, stream, step, s)
                x, real_len = rollout_batch(x, pool, step, s)
            if acfg is not None:
                total, ce_ar, ce_diff = adapter_losses(model, x, s.block_size, s.draft_target)
            else:
                total, ce_ar, ce_diff = losses(model, x, s.mode, s.block_size, s.ar_weight, s.draft_target, real_len)
            opt.zero_grad(set_to_none=True)
            total.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.grad_clip)
            opt.step()
            step += 1
            tokens_seen += x.shape[0] * s.seq_len
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            over = cpu_budget is not None and cpu >= cpu_budget
            acc["loss"] += total.item()
            acc["ar"] += ce_ar.item()
            acc["diff"] += ce_diff.item() if ce_diff is not None else 0.0
            acc["n"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {total.item():.3f}")
            if step % log_every == 0 or step == end or over:
                n, dt = acc["n"], time.perf_counter() - t_log
                rec = {"step": step, "loss": round(acc["loss"] / n, 4), "ce_ar": round(acc["ar"] / n, 4),
                       "ce_diff": round(acc["diff"] / n, 4) if s.mode == "tidar" else None,
                       "lr": float(f"{lr:.3e}"), "tok_s": round(n * s.batch_size * s.seq_len / dt),
                       "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu, 1)}
                history.append(rec)
                eta = (end - step) * dt / n
                diff_txt = f" diff {rec['ce_diff']:.3f}" if s.mode == "tidar" else ""
                log(f"step {step}/{s.steps} loss {rec['loss']:.3f} (ar {rec['ce_ar']:.3f}{diff_txt}) "
                    f"lr {lr:.2e} {rec['tok_s']:,} tok/s elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")
                acc = {"loss": 0.0, "ar": 0.0, "diff": 0.0, "n": 0}
                t_log = time.perf_counter()
            if step % save_every == 0 or step == end or over:
                model.eval()
                save_run(out, model, opt, snapshot(), tok_dir, extra(), base)
                model.train()
        if bar is not None:
            bar.close()
        if not resume and not (out / STATE_JSON).is_file():  # nothing to run: still leave a run folder
            save_run(out, model.eval(), opt, snapshot(), tok_dir, base=base)
        return snapshot()


# ---------------------------------------------------------------------------------------------
# Command line
