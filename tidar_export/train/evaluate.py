"""`tidar-export eval`: held-out quality and TiDAR tokens per forward of a checkpoint.

Reports, on the held-out files of a corpus (`tidar_export.train.data`: never seen in training):
- AR-mode loss and next-token accuracy: plain causal next-token prediction over windows of
  `--seq-len` tokens (what the model is worth as an AR model);
- the diffusion loss of the training objective at the checkpoint's block size, and the
  diffusion accuracy by slot t of the block (slot t predicts t tokens past the next one: the
  draft quality that greedy acceptance depends on);
- greedy decoding of `--num-prompts` held-out prompts, AR and TiDAR at each `--block-sizes`
  b: tokens per forward (T/NFE, decode forwards only, docs/ALGORITHM.md section 4), the accepted-length
  histogram, the acceptance rate of each draft slot (given the earlier slots were accepted),
  and whether the TiDAR tokens equal the AR tokens (they must: greedy verification with
  beta = 1 reproduces the AR decode).
Decoding uses `TorchBackend` under the runtime's loop, batch 1 as in the paper.
"""

from __future__ import annotations

import time
from pathlib import Path

from tidar_export.train import data
from tidar_export.errors import TiDARError


def heldout_stream(checkpoint: Path, corpus: str, pattern: str, eos_id: int | None):
    tok = data.load_tokenizer(checkpoint)
    split = data.find_corpus(corpus, pattern)
    return data.token_stream(tok, data.read_texts(split.heldout), eos_id), split


def lm_metrics(model, stream, seq_len: int, max_tokens: int, batch: int = 8) -> dict:
    """AR-mode cross-entropy / accuracy over non-overlapping windows, and the TiDAR diffusion loss."""
    import torch
    import torch.nn.functional as F

    from tidar_export.model import masks
    from tidar_export.train.trainer import tidar_batch

    S = seq_len
    n_win = min((len(stream) - 1) // S, max(1, max_tokens // S))
    if n_win < 1:
        raise TiDARError(f"held-out text has {len(stream)} tokens: fewer than --seq-len {S} + 1")
    t = torch.from_numpy(stream[: n_win * S + 1]).long()
    windows = torch.stack([t[i * S : i * S + S + 1] for i in range(n_win)])  # [N, S+1]
    ce_sum, correct, diff_sum, diff_correct, count = 0.0, 0, 0.0, 0, 0
    b = model.cfg.block_size
    slot_correct = torch.zeros(b, dtype=torch.long)  # diffusion hits by slot t of the block
    with torch.no_grad():
        for i in range(0, n_win, batch):
            x = windows[i : i + batch]
            ids, labels = x[:, :S], x[:, 1:]
            pos = torch.arange(S)[None].expand(len(x), -1)
            logits, _, _ = model(ids, pos, masks.causal_mask(S))
            ce_sum += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            if S % b == 0:
                ids2, pos2, mask2, labels2 = tidar_batch(x, b, model.cfg.mask_token_id)
                dl, _, _ = model(ids2, pos2, mask2, draft_rows=S)  # the mask rows: the last S
                dl, dy = dl[:, S:], labels2[:, S:]
                diff_sum += F.cross_entropy(dl.flatten(0, 1).float(), dy.flatten(), reduction="sum").item()
                hit = dl.argmax(-1) == dy  # [B, S]
                diff_correct += hit.sum().item()
                slot_correct += hit.view(len(x), S // b, b).sum((0, 1))
            count += labels.numel()
    out = {"eval_tokens": count, "ar_loss": round(ce_sum / count, 4),
           "next_token_acc": round(correct / count, 4)}
    if S % b == 0:
        out |= {"diff_loss": round(diff_sum / count, 4), "diff_acc": round(diff_correct / count, 4),
                "diff_block_size": b,
                "diff_acc_by_slot": [round(c / (count // b), 4) for c in slot_correct.tolist()]}
    return out


def prompts_from(stream, num: int, prompt_len: int, max_new: int) -> list[list[int]]:
    """`num` prompts of `prompt_len` tokens at evenly spaced offsets of the held-out stream."""
    span = len(stream) - prompt_len - max_new
    if span < num:
        raise TiDARError(f"held-out text has {len(stream)} tokens: too few for {num} prompts of "
                         f"{prompt_len} + {max_new} tokens")
    return [[int(v) for v in stream[o : o + prompt_len]] for o in (i * span // num for i in range(num))]


def acceptance_by_slot(hist, block_size: int) -> list[float | None]:
    """Greedy acceptance of draft slot t = 1..b-1 given that drafts 1..t-1 were accepted.

    With dense proposals every step offers b - 1 drafts, and a step that emits k tokens accepted
    drafts 1..k-1, so the rate of slot t is #(k > t) / #(k >= t). None where no step got there.
    """
    n_ge = lambda t: sum(v for k, v in hist.items() if k >= t)  # noqa: E731
    return [round(n_ge(t + 1) / n_ge(t), 4) if n_ge(t) else None for t in range(1, block_size)]


def greedy_ar(model, prompts, max_new: int, stop, max_len: int) -> tuple[list[list[int]], float]:
    """Each prompt's greedy AR continuation (torch reference loop) and the seconds they took."""
    from tidar_export.model.reference import TorchBackend
    from tidar_runtime import SamplingParams, generate_ar

    out, took = [], 0.0
    backend = TorchBackend(model, max_len, block_size=1)  # one cache, reused: each prefill starts at slot 0
    for p in prompts:
        t0 = time.perf_counter()
        out.append(generate_ar(backend, p, max_new, SamplingParams(), stop).tokens)
        took += time.perf_counter() - t0
    return out, took


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """How far greedy outputs follow a reference model's: identical prompts, and the share of the
    reference's tokens reproduced before each prompt's first divergence."""
    same = 0
    for a, r in zip(outputs, reference):
        n = 0
        while n < min(len(a), len(r)) and a[n] == r[n]:
            n += 1
        same += n
    total = sum(len(r) for r in reference)
    return {"prompts_equal": sum(a == r for a, r in zip(outputs, reference)), "prompts": len(reference),
            "token_agreement": round(same / max(1, total), 4)}


def decode_max_len(prompts, block_sizes, max_new: int, sparse=()) -> int:
    """KV-cache length that fits the longest prompt, its continuation and the widest TiDAR step."""
    widths = [b * (b + 1) for b in block_sizes] + [b * (b + 1) for b, _ in sparse]
    return max(len(p) for p in prompts) + max_new + max(widths, default=1) + 1


def decode_metrics(model, prompts, block_sizes, max_new: int, stop, sparse=(), reference_out=None) -> dict:
    """Greedy AR, then TiDAR at each b (dense proposals) and each sparse (b, proposals) of `sparse`:
    T/NFE, histogram, TiDAR == AR per prompt. Reported under "b" (dense) and "b:r,r" (sparse).
    reference_out: another model's greedy outputs on the same prompts; the AR outputs' `agreement`
    with them is reported under "reference"."""
    from collections import Counter

    from tidar_export.model.reference import TorchBackend
    from tidar_runtime import SamplingParams, generate_tidar

    greedy = SamplingParams()
    settings = [(b, None) for b in block_sizes] + [(b, tuple(rs)) for b, rs in sparse]
    max_len = decode_max_len(prompts, block_sizes, max_new, sparse)
    ar_out, ar_time = greedy_ar(model, prompts, max_new, stop, max_len)
    n_ar = sum(len(t) for t in ar_out)
    report = {"ar": {"tokens": n_ar, "tokens_per_s_cpu": round(n_ar / ar_time, 1)}, "tidar": {}}
    if reference_out is not None:
        report["reference"] = agreement(ar_out, reference_out)
    for b, rs in settings:
        tokens, accepted, hist, mismatched, t_all = 0, [], Counter(), [], 0.0
        backend = TorchBackend(model, max_len, block_size=b, proposals=rs)
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            res = generate_tidar(backend, p, max_new, greedy, stop)
            t_all += time.perf_counter() - t0
            tokens += len(res.tokens)
            accepted += res.stats.accepted
            hist.update(res.stats.accepted)
            if res.tokens != ar_out[i]:
                mismatched.append(i)
        key = str(b) if rs is None else f"{b}:{','.join(str(r) for r in rs)}"
        report["tidar"][key] = {
            "tokens_per_forward": round(sum(accepted) / max(1, len(accepted)), 3),
            "forwards": len(accepted), "tokens": tokens,
            "accepted_histogram": dict(sorted(hist.items())),
            "acceptance_by_slot": acceptance_by_slot(hist, b) if rs is None else None,
            "equals_ar": not mismatched, "mismatched_prompts": mismatched,
            "tokens_per_s_cpu": round(tokens / t_all, 1),
        }
    report["tidar_equals_ar"] = all(r["equals_ar"] for r in report["tidar"].values())
    return report


def evaluate(checkpoint: str, corpus: str = "stdlib", pattern: str = "*.py", seq_len: int | None = None,
             max_eval_tokens: int = 65536, block_sizes=(4, 8, 16), num_prompts: int = 20,
             prompt_len: int = 64, max_new_tokens: int = 128, sparse=(), reference: str | None = None) -> dict:
    """The eval report of a checkpoint. reference: another checkpoint (the model a full-weight run
    started from) whose greedy outputs the checkpoint's are compared with (`agreement`)."""
    from tidar_export.model.checkpoint import load_checkpoint

    ckpt = Path(checkpoint)
    model = load_checkpoint(ckpt)
    cfg = model.cfg
    if not (ckpt / "tokenizer.json").is_file():
        raise TiDARError(f"{ckpt} has no tokenizer.json: eval needs the checkpoint's tokenizer")
    if any(b < 1 for b in block_sizes) or not block_sizes:
        raise TiDARError(f"block sizes must be >= 1, got {list(block_sizes)}")
    if num_prompts < 1 or prompt_len < 1 or max_new_tokens < 1:
        raise TiDARError("--num-prompts, --prompt-len and --max-new-tokens must be >= 1")
    S = seq_len or min(256, cfg.max_position_embeddings)
    stream, split = heldout_stream(ckpt, corpus, pattern, (cfg.eos_ids or [None])[0])
    if len(stream) and int(stream.max()) >= cfg.vocab_size:
        raise TiDARError(f"the tokenizer produces id {int(stream.max())}, outside the vocabulary ({cfg.vocab_size})")
    t0 = time.perf_counter()
    report = {
        "checkpoint": ckpt.name, "params": cfg.num_params(), "train_block_size": cfg.block_size,
        "corpus": {"root": corpus, "heldout_files": len(split.heldout), "heldout_tokens": int(len(stream))},
        "seq_len": S,
    }
    report |= lm_metrics(model, stream, S, max_eval_tokens)
    prompts = prompts_from(stream, num_prompts, prompt_len, max_new_tokens)
    stop = cfg.eos_ids
    reference_out = None
    if reference is not None:
        ref = load_checkpoint(reference)
        if (ref.cfg.vocab_size, ref.cfg.eos_ids) != (cfg.vocab_size, cfg.eos_ids):
            raise TiDARError(f"--reference {reference}: another vocabulary or stop tokens than {ckpt}")
        max_len = decode_max_len(prompts, list(block_sizes), max_new_tokens, sparse)
        reference_out, _ = greedy_ar(ref, prompts, max_new_tokens, stop, max_len)
        report["reference"] = Path(reference).name
        del ref
    report["decode"] = {"prompts": num_prompts, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
                        "greedy": True} | decode_metrics(model, prompts, list(block_sizes), max_new_tokens, stop,
                                                                       sparse, reference_out)
    report["eval_s"] = round(time.perf_counter() - t0, 1)
    return report
