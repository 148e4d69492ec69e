"""The draft adapter: small trainable weights that act on the mask-token rows only.

A TiDAR pass holds two kinds of rows: AR rows (the prompt, the drafts being verified) and mask
rows (the diffusion block that pre-drafts the next tokens). A draft adapter adds low-rank
updates `scale * B @ A` to chosen projections (q/k/v/o/gate/up/down) of chosen layers, and
optionally a learned offset to the residual stream at the first adapted layer, and applies
them to the mask rows only. The AR rows compute the original weights, so the greedy output of
TiDAR with an adapter equals the original model's greedy decode token for token; the adapter
only changes which drafts are proposed (and so how many are accepted).

Which rows are mask rows is static per graph kind: they are always the trailing rows of a
pass (the prefill's b masks, the step's proposal blocks, the second half of a training
sequence), so the forward takes their count `draft_rows` and the exported graphs get two
small MatMuls per adapted projection acting on those rows only; the AR step has none.

On disk an adapter is two files beside a checkpoint's config.json (or in a folder of their
own): `adapter.json` (its `AdapterConfig`) and `adapter.safetensors` (its tensors, named
`layers.{i}.{proj}.lora_A` [rank, in], `layers.{i}.{proj}.lora_B` [out, rank] and
`embed_offset` [hidden]). `load_checkpoint` attaches one it finds there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tidar_export.errors import TiDARError

ADAPTER_JSON = "adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_FORMAT = "tidar-draft-adapter"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 4  # r of every low-rank update B @ A
    layers: tuple[int, ...] = ()  # adapted decoder layers (indices); () means all of them
    alpha: float = 8.0  # the update is scaled by alpha / rank
    projections: tuple[str, ...] = PROJECTIONS  # adapted projections of each layer
    embed_offset: bool = True  # a learned vector added to the mask rows at the first adapted layer
    format: str = ADAPTER_FORMAT

    def __post_init__(self) -> None:
        if type(self.rank) is not int or not 1 <= self.rank <= 4096:
            raise TiDARError(f"adapter rank must be an integer in 1..4096, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise TiDARError(f"adapter alpha must be a positive number, got {self.alpha!r}")
        bad = [p for p in self.projections if p not in PROJECTIONS]
        if bad:
            raise TiDARError(f"adapter projections must be a subset of {', '.join(PROJECTIONS)}, "
                             f"got {list(self.projections)}")
        if not self.projections and not self.embed_offset:
            raise TiDARError("an adapter without projections is its embedding offset alone: it needs embed_offset "
                             "(--adapter-projections none without --no-adapter-embed)")
        if any(type(i) is not int or i < 0 for i in self.layers):
            raise TiDARError(f"adapter layers must be layer indices >= 0, got {list(self.layers)}")
        if self.format != ADAPTER_FORMAT:
            raise TiDARError(f"not a draft adapter (format {self.format!r})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The adapted layer indices of a model with `num_layers` layers (checked)."""
        ids = tuple(sorted(set(self.layers))) if self.layers else tuple(range(num_layers))
        if ids and ids[-1] >= num_layers:
            raise TiDARError(f"adapter layer {ids[-1]} does not exist: the model has {num_layers} layers")
        return ids

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d | {"layers": list(self.layers), "projections": list(self.projections)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise TiDARError(f"adapter config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TiDARError(f"adapter config: unknown field {unknown[0]!r}")
        d = dict(d)
        for key in ("layers", "projections"):
            if key in d:
                if not isinstance(d[key], list):
                    raise TiDARError(f"adapter config: {key} must be a list")
                d[key] = tuple(d[key])
        return cls(**d)


def parse_projections(text: str) -> tuple[str, ...]:
    """'all' -> every projection; 'none' -> () (the embedding offset alone); 'q,k,v,o' or 'q_proj,up_proj' -> those."""
    text = text.strip()
    if text == "all":
        return PROJECTIONS
    if text == "none":
        return ()
    names = tuple(p if p.endswith("_proj") else f"{p}_proj" for p in (t.strip() for t in text.split(",")))
    bad = [n for n in names if n not in PROJECTIONS]
    if bad or not names:
        raise TiDARError(f"--adapter-projections: expected 'all', 'none' or a list of q,k,v,o,gate,up,down, "
                         f"got {text!r}")
    return tuple(p for p in PROJECTIONS if p in names)


def parse_layers(text: str, num_layers: int | None = None) -> tuple[int, ...]:
    """'all' -> (); '20-29' -> (20, ..., 29); '0,5,7' -> (0, 5, 7); 'top8' -> the last 8 (needs num_layers)."""
    text = text.strip()
    try:
        if text == "all":
            return ()
        if text.startswith("top"):
            if num_layers is None:
                raise TiDARError("--adapter-layers topN needs the model's layer count")
            n = int(text[3:])
            return tuple(range(max(0, num_layers - n), num_layers))
        out: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
        return tuple(out)
    except ValueError:
        raise TiDARError(f"--adapter-layers: expected 'all', 'topN', 'A-B' or 'i,j,k', got {text!r}") from None


class LowRank(nn.Module):
    """One low-rank update: x -> scale * (x @ A^T) @ B^T. B starts at zero (the update starts at 0)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.t().to(x.dtype)) @ (self.lora_B.t() * self.scale).to(x.dtype)


class LayerAdapter(nn.Module):
    """The updates of one decoder layer, by projection name (and the embedding offset, if it is the first)."""

    def __init__(self, cfg, acfg: AdapterConfig, first: bool):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        shapes = {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (h * hd, d),
                  "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
        for name in acfg.projections:
            self.add_module(name, LowRank(*shapes[name], acfg.rank, acfg.scale))
        self.embed_offset = nn.Parameter(torch.zeros(d)) if first and acfg.embed_offset else None

    def update(self, name: str, x: torch.Tensor, y: torch.Tensor, draft_rows: int) -> torch.Tensor:
        """y = proj(x) with the update of `name` added on the last `draft_rows` rows of dim 1."""
        lr = getattr(self, name, None)
        if lr is None or draft_rows <= 0:
            return y
        return on_tail(y, draft_rows, lambda tail: tail + lr(x[:, -draft_rows:]))

    def offset(self, x: torch.Tensor, draft_rows: int) -> torch.Tensor:
        if self.embed_offset is None or draft_rows <= 0:
            return x
        return on_tail(x, draft_rows, lambda tail: tail + self.embed_offset.to(x.dtype))


def on_tail(y: torch.Tensor, n: int, fn) -> torch.Tensor:
    """y with fn applied to its last n rows (dim 1); the other rows are the very same values."""
    if n >= y.shape[1]:
        return fn(y)
    return torch.cat([y[:, :-n], fn(y[:, -n:])], dim=1)


class DraftAdapter(nn.Module):
    """All layers' updates: `layers[str(i)]` is layer i's `LayerAdapter` (adapted layers only)."""

    def __init__(self, cfg, acfg: AdapterConfig):
        super().__init__()
        self.acfg = acfg
        ids = acfg.layer_ids(cfg.num_layers)
        self.layers = nn.ModuleDict({str(i): LayerAdapter(cfg, acfg, first=(i == ids[0])) for i in ids})

    def for_layer(self, i: int) -> LayerAdapter | None:
        return self.layers[str(i)] if str(i) in self.layers else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: `layers.{i}.{proj}.lora_A` ... and `embed_offset`."""
        out = {}
        for name, p in self.named_parameters():
            if name.endswith("embed_offset"):
                name = "embed_offset"
            out[name] = p.detach().float().contiguous().cpu()
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attach(model, acfg: AdapterConfig, tensors: dict[str, torch.Tensor] | None = None) -> DraftAdapter:
    """Give `model` a draft adapter (fresh, or with `tensors` from a file); returns it."""
    adapter = DraftAdapter(model.cfg, acfg)
    if tensors is not None:
        own = adapter.tensors()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise TiDARError(f"adapter tensors do not match its config: {which}")
        params = dict(adapter.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                t = tensors["embed_offset" if name.endswith("embed_offset") else name]
                if tuple(t.shape) != tuple(p.shape):
                    raise TiDARError(f"adapter tensor {name} has shape {tuple(t.shape)}, "
                                     f"the model needs {tuple(p.shape)}")
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise TiDARError(f"adapter tensor {name} must hold finite floating-point values")
                p.copy_(t)
    else:
        init_offset(model, adapter)
    p0 = model.lm_head.weight
    model.adapter = adapter.to(dtype=p0.dtype if p0.device.type != "meta" else torch.float32)
    return model.adapter


def init_offset(model, adapter: DraftAdapter) -> None:
    """Fresh adapter: the offset starts where it turns the mask token's embedding into the mean
    token embedding (starting from the mask token's own embedding, an arbitrary token, costs
    the first steps of training), when the first adapted layer is layer 0; else it starts at 0."""
    first = adapter.for_layer(0)
    E = model.model.embed_tokens.weight
    if first is None or first.embed_offset is None or E.device.type == "meta" or not any(E.stride()):
        return
    with torch.no_grad():
        first.embed_offset.copy_(E.float().mean(0) - E[model.cfg.mask_token_id].float())


def has_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_JSON).is_file()


def read_adapter(folder: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of the adapter files in `folder`; one-line TiDARError when unreadable."""
    from safetensors.torch import load_file

    folder = Path(folder)
    js, ts = folder / ADAPTER_JSON, folder / ADAPTER_TENSORS
    if not js.is_file() or not ts.is_file():
        raise TiDARError(f"{folder}: no draft adapter ({ADAPTER_JSON} and {ADAPTER_TENSORS} expected)")
    try:
        d = json.loads(js.read_text())
    except (OSError, ValueError) as e:
        raise TiDARError(f"{js}: unreadable adapter config ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(ts))
    except Exception as e:  # safetensors' own error types
        raise TiDARError(f"{ts}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return AdapterConfig.from_dict(d), tensors


def write_adapter(adapter: DraftAdapter, folder: str | os.PathLike) -> None:
    """adapter.json and adapter.safetensors into the existing `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(adapter.tensors(), str(folder / ADAPTER_TENSORS), metadata={"format": "pt"})
    (folder / ADAPTER_JSON).write_text(json.dumps(adapter.acfg.to_dict(), indent=1) + "\n")


def describe(adapter: DraftAdapter) -> dict:
    """The manifest's record of an adapter: its config, parameter count and a digest of its tensors."""
    h = hashlib.sha256()
    for name, t in sorted(adapter.tensors().items()):
        h.update(name.encode() + b"\0" + t.numpy().tobytes())
    return adapter.acfg.to_dict() | {"params": adapter.num_params(), "sha256": h.hexdigest()[:16]}
