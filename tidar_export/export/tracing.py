"""Tracing: the TiDAR passes as nn.Modules, traced to ONNX with torch.onnx's dynamo exporter.

Three graphs, each a small nn.Module around the reference model (docs/EXPORT.md):
- `PrefillGraph`: [prompt | M x b] from an empty cache (dynamic batch and prompt length).
- `StepGraph`:    one TiDAR decode step over a preallocated cache (static shapes).
- `ARStepGraph`:  one plain AR token over the same cache (the baseline).
Each appends the mask tokens, builds positions and the attention mask from constants and the
length input (masks.py is the one source of the patterns), and reads out only the rows the
loop needs (tidar_runtime.contract). `trace` returns the optimized ONNX IR of one graph with
HF weight names, module-path node names, and the manifest's binding names and dims.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from collections.abc import Sequence

import onnx_ir as ir
import torch
from torch import nn

from tidar_export.model import masks
from tidar_export.model.transformer import TiDARModel
from tidar_export.export.plan import ExportPlan
from tidar_runtime.contract import FLOAT_PRECISIONS, INPUT_IDS, TensorSpec, prefill_out_rows

# Opset the tracer emits: torchlib's native opset, so torch.onnx runs no version converter.
# Targets that want newer ops (opset-23 Attention, opset-24 TensorScatter) get them from
# tidar_graphs.lower; the manifest records the opsets of the lowered graphs.
EXPORT_OPSET = 18


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a float precision ("fp16" -> torch.float16; contract.FLOAT_PRECISIONS)."""
    return getattr(torch, FLOAT_PRECISIONS[precision])


# --------------------------------------------------------------------------- graph modules


class _GraphModule(nn.Module):
    """Common part of the three graph wrappers: the model and the output head."""

    def __init__(self, model: TiDARModel):
        super().__init__()
        self.tidar = model  # initializers come out as "tidar.<HF name>"; the prefix is stripped

    @property
    def cfg(self):
        return self.tidar.cfg

    def head(self, h: torch.Tensor, rows: torch.Tensor):
        """LM head on the selected rows only: token ids [B, n] (argmax) and float32 logits [B, n, V]."""
        logits = self.tidar.lm_head(h.index_select(1, rows)).float()
        return logits.argmax(-1), logits

    @staticmethod
    def flat_kv(keys, values) -> list[torch.Tensor]:
        return [t for kv in zip(keys, values) for t in kv]  # present.0.key, present.0.value, ...


class PrefillGraph(_GraphModule):
    """[prompt | M x b] from an empty cache. input_ids [B, P] -> token_ids [B, b], logits [B, b, V],
    present.{i}.key/value [B, KV, P + b, hd]. Row 0 is AR at p_{P-1}, rows 1..b-1 mask slots 1..b-1."""

    def __init__(self, model: TiDARModel, block_size: int):
        super().__init__(model)
        self.block_size = block_size
        # the output rows relative to P (the prompt length is a dynamic dim): [P-1, P+1, ..., P+b-1]
        self.register_buffer("row_offsets", torch.tensor(prefill_out_rows(0, block_size)), persistent=False)

    def forward(self, input_ids: torch.Tensor):
        P = input_ids.shape[1]
        ids, positions, mask = masks.prefill_pass(input_ids, self.block_size, self.cfg.mask_token_id)
        h, keys, values = self.tidar.hidden(ids, positions, mask, draft_rows=self.block_size)
        token_ids, logits = self.head(h, self.row_offsets + P)  # the rows, from P (a dynamic dim) as a graph op
        return token_ids, logits, *self.flat_kv(keys, values)


class _CachedGraph(_GraphModule):
    """A pass over the preallocated cache: q_len new tokens at positions cache_len + offsets."""

    def __init__(self, model: TiDARModel, static: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kv_update: str):
        super().__init__(model)
        in_step, offsets, out_rows = static  # masks.step_pass / masks.ar_pass
        self.kv_update = kv_update
        self.register_buffer("in_step", in_step, persistent=False)  # [q, q] bool: the static mask
        self.register_buffer("offsets", offsets, persistent=False)  # [q] position offsets from L
        self.register_buffer("out_rows", out_rows, persistent=False)

    def run(self, ids: torch.Tensor, cache_len: torch.Tensor, past: Sequence[torch.Tensor]):
        given = ids.shape[1]  # drafts (step) or the AR token: the rest are mask rows, where a draft adapter acts
        ids = masks.pass_ids(ids, len(self.offsets), self.cfg.mask_token_id)
        h, keys, values = self.tidar.hidden(ids, masks.pass_positions(cache_len, self.offsets), self.in_step,
                                            list(past[0::2]), list(past[1::2]), cache_len, kv_update=self.kv_update,
                                            draft_rows=len(self.offsets) - given)
        token_ids, logits = self.head(h, self.out_rows)
        return token_ids, logits, *self.flat_kv(keys, values)


class StepGraph(_CachedGraph):
    """One TiDAR decode step (docs/ALGORITHM.md section 4). draft_ids [B, b], cache_len [B], past_key_values.* ->
    token_ids [B, n_out], logits [B, n_out, V], present.* (rows: tidar_runtime.contract)."""

    def __init__(self, model: TiDARModel, block_size: int, proposals: Sequence[int], kv_update: str):
        super().__init__(model, masks.step_pass(block_size, proposals), kv_update)

    def forward(self, draft_ids: torch.Tensor, cache_len: torch.Tensor, *past: torch.Tensor):
        return self.run(draft_ids, cache_len, past)


class ARStepGraph(_CachedGraph):
    """One AR token. input_ids [B, 1], cache_len [B], past_key_values.* -> token_ids [B, 1],
    logits [B, 1, V], present.*."""

    def __init__(self, model: TiDARModel, kv_update: str):
        super().__init__(model, masks.ar_pass(), kv_update)

    def forward(self, input_ids: torch.Tensor, cache_len: torch.Tensor, *past: torch.Tensor):
        return self.run(input_ids, cache_len, past)


def graph_module(model: TiDARModel, plan: ExportPlan, kind: str) -> _GraphModule:
    if kind == "prefill":
        return PrefillGraph(model, plan.block_size).eval()
    if kind == "step":
        return StepGraph(model, plan.block_size, plan.proposals, plan.kv_update_of("step")).eval()
    if kind == "ar_step":
        return ARStepGraph(model, plan.kv_update_of("ar_step")).eval()
    raise ValueError(kind)


def example_inputs(cfg, plan: ExportPlan, kind: str) -> tuple[torch.Tensor, ...]:
    """Tracing inputs. Dynamic dims get example sizes >= 2: torch.export silently specializes a
    dim whose example size is 0 or 1 (measured with torch 2.13: Dim("prefill_batch", min=1) and a
    batch-1 example traced input_ids as [1, prompt_len]; the "0/1 specialization problem",
    https://github.com/pytorch/pytorch/issues/122294). `_fix_io` rejects a graph where it happened."""
    if kind == "prefill":
        return (torch.randint(0, cfg.vocab_size, (2, 5)),)
    B, S = plan.max_batch, plan.max_seq_len
    width = plan.block_size if kind == "step" else 1
    ids = torch.randint(0, cfg.vocab_size, (B, width))
    cache_len = torch.arange(B, dtype=torch.long) % max(1, S - plan.q_len)
    past = [torch.zeros(B, cfg.num_kv_heads, S, cfg.head_dim, dtype=torch_dtype(plan.precision))
            for _ in range(2 * cfg.num_layers)]
    return (ids, cache_len, *past)


def trace(model: TiDARModel, plan: ExportPlan, kind: str, prepare=None) -> ir.Model:
    """Trace one graph with torch.onnx's dynamo exporter; returns the optimized ONNX IR model.

    prepare: called with the traced model (HF weight names) before torch.onnx's optimizer runs;
    the streaming export gives the weights their data there (tidar_export.export.artifact)."""
    module = graph_module(model, plan, kind)
    contract = plan.manifest(dataclasses.asdict(model.cfg))  # the bindings and dims the graph must have
    inputs, outputs = contract.graphs[kind].inputs, contract.graphs[kind].outputs
    dynamic_shapes = None
    if kind == "prefill":
        dynamic_shapes = {INPUT_IDS: {0: torch.export.Dim("prefill_batch", min=1),
                                        1: torch.export.Dim("prompt_len", min=1, max=plan.max_seq_len)}}
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module, example_inputs(model.cfg, plan, kind), dynamo=True, opset_version=EXPORT_OPSET,
            input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
        )
    _name_weights(program.model)
    if prepare is not None:
        prepare(program.model)
    program.optimize()  # torch.onnx's own constant folding and cleanup (folds the weight transposes)
    m = program.model
    _name_nodes(m)
    _fix_io(m, inputs, outputs, contract.dims)
    m.graph.name = kind
    return m


@contextlib.contextmanager
def _quiet_exporter():
    """Silence two messages torch.onnx prints on every export that say nothing about ours:
    "torchvision is not installed. Skipping torchvision::nms" (one log line per torchvision op)
    and the FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated" raised inside torch."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def _name_weights(model: ir.Model) -> None:
    """HF names for the weights ("model.layers.0.mlp.up_proj.weight"); "<name>.T" for the [in, out]
    copies that constant folding makes of nn.Linear weights (otherwise they would be "val_123")."""
    g = model.graph
    for value in list(g.initializers.values()):
        if value.name.startswith("tidar."):
            value.name = value.name[len("tidar."):]
    taken = {v.name for v in g.inputs} | set(g.initializers) | {v.name for node in g for v in node.outputs}
    for node in g:
        src = node.inputs[0] if node.inputs else None
        if node.op_type == "Transpose" and node.domain == "" and src is not None and src.is_initializer():
            name = f"{src.name}.T"
            if name not in taken and not node.outputs[0].is_graph_output():
                taken.add(name)
                node.outputs[0].name = name


_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _name_nodes(model: ir.Model) -> None:
    """Node names from the module path: "/model/layers.0/self_attn/q_proj/MatMul", so that graph diffs read by layer.

    Then drops the tracer's node metadata: the names carry the module path, and its stack
    traces would put absolute source paths of the exporting machine into the artifact.
    """
    seen: dict[str, int] = {}
    for node in model.graph:
        scopes = node.metadata_props.get(_SCOPES_KEY)
        node.metadata_props.clear()
        if not scopes:
            continue
        # e.g. "['', 'tidar.model.layers.0', 'tidar.model.layers.0.self_attn', 'linear_3']": the last
        # entry is the FX node, the one before it the innermost module
        parts = re.findall(r"'([^']*)'", scopes)
        module = parts[-2] if len(parts) >= 2 else ""
        if not module.startswith("tidar"):  # the wrapper's own ops (and the tracer's placeholder scopes)
            module = ""
        module = module.removeprefix("tidar").removeprefix(".")
        path = re.sub(r"\.(?!\d)", "/", module)  # keep "layers.0" together
        base = f"/{path}/{node.op_type}" if path else f"/{node.op_type}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"


def _fix_io(model: ir.Model, inputs: list[TensorSpec], outputs: list[TensorSpec], dims: dict) -> None:
    """Check the traced bindings against the plan; give dynamic dims their manifest names
    (the tracer would call the prefill's K/V length "prompt_len + 4")."""
    for values, specs in ((model.graph.inputs, inputs), (model.graph.outputs, outputs)):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise RuntimeError(f"traced bindings {names} differ from the plan {[s.name for s in specs]}")
        for v, spec in zip(values, specs):
            if v.shape is None or len(v.shape) != len(spec.shape):
                raise RuntimeError(f"{v.name}: traced shape {v.shape} does not match {spec.shape}")
            new = []
            for traced, want in zip(v.shape, spec.shape):
                value = want if isinstance(want, int) else dims[want]
                if value is None and isinstance(traced, int):  # see example_inputs
                    raise RuntimeError(f"{v.name}: torch.export specialized the dynamic dim {want!r} to {traced}")
                if value is None:
                    new.append(ir.SymbolicDim(want))
                elif isinstance(traced, int) and traced != value:
                    raise RuntimeError(f"{v.name}: traced shape {v.shape} does not match {spec.shape}")
                else:
                    new.append(value)
            v.shape = ir.Shape(new)


