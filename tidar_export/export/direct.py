"""Graphs built directly: the ort target's prefill, step and AR step, node by node (no tracing).

The traced path (tidar_export.export.tracing, then `tidar_graphs.lower`) runs torch.export,
torch.onnx and the lowering passes for each graph; on a 30-layer model that is most of an
export's time. This module writes the graphs those passes produce for the ort target
directly with onnx_ir, from the export plan, the model config and the checkpoint's tensors:
the same bindings (the manifest's names, dtypes and dims), the same weights under the same
names (the fused q/k/v weight `...qkv_proj.weight.T`, the [in, out] copies `...weight.T`),
and the same op patterns: opset-23 RMSNormalization, RotaryEmbedding and Attention, the
packed q/k/v MatMul and Split, SiLU as Sigmoid * Mul, the prefill mask from Range and two
comparisons, the step graphs' attention over the used cache slots (the "slice" cache update),
and the AR step as ONNX Runtime's GroupQueryAttention over the shared cache (the "inplace"
form; graphs/contrib.py explains it). tests/test_direct_build.py checks each graph's outputs
against the traced graph's in ONNX Runtime.

Weights stay lazy (`_Weight`): a tensor is read from its shard only when the weights file
writes it, once for all three graphs (`WeightFile.externalize_ir` keys it by `source_key`).

`unsupported` names what this builder does not cover (the exporter then traces the graphs).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from tidar_runtime.contract import CACHE_LEN, prefill_out_rows

OPSET = 23  # the ort target's default-domain opset (tidar_graphs.get_target("ort").opset)
MS_DOMAIN = "com.microsoft"
PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"int64": ir.DataType.INT64, "int32": ir.DataType.INT32, "float32": ir.DataType.FLOAT,
           "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


def unsupported(cfg, plan) -> str | None:
    """Why this builder cannot make the graphs of `plan` for a model of config `cfg`; None when it can."""
    if plan.target != "ort":
        return f"target {plan.target} (the direct builder makes ort graphs)"
    if plan.precision not in PRECISIONS:
        return f"precision {plan.precision} (the direct builder makes {' and '.join(PRECISIONS)} graphs)"
    return None


def build_graph(kind: str, cfg, plan, spec, dims: dict, source, adapter=None) -> ir.Model:
    """Graph `kind` of `plan` (the manifest's graph entry `spec`, its `dims`), its weights lazy
    reads of `source` (checkpoint.StreamedWeights); `adapter`: the model's draft adapter or None."""
    form = "prefill" if kind == "prefill" else "gqa" if plan.kv_update_of(kind) == "inplace" else "slice"
    b = _Builder(kind, cfg, spec, dims, source, plan.kv_dtype)
    if form == "prefill":
        ids, rows = b.prefill_inputs(plan.block_size)
        draft_rows = plan.block_size  # the b mask rows after the prompt
    else:
        ids, rows, draft_rows = b.cached_inputs(kind, plan, form)
    x = b.op("Gather", [b.weight(b.embedding_name), ids], "/model/embed_tokens/Gather", axis=0)
    for i in range(cfg.num_layers):
        ad = adapter.for_layer(i) if adapter is not None and draft_rows > 0 else None
        x = b.layer(i, x, form, _Adapted(b, ad, i) if ad is not None else None)
    b.head(x, rows)
    return b.model(form)


class _Weight(ir.LazyTensor):
    """Checkpoint tensors `names`, concatenated along their first axis and transposed where
    asked ([out, in] -> [in, out]), read from the shards only when written."""

    def __init__(self, source, names: list[str], transposed: bool, name: str):
        shapes = [tuple(source.tensor_shape(n)) for n in names]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        shape = shape[::-1] if transposed else shape
        dtype = _DTYPES[str(source.dtype).removeprefix("torch.")]
        super().__init__(self._read, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.source, self.names, self.transposed = source, names, transposed
        # the weights file writes a tensor once per key, whichever graph asks
        self.source_key = (*(source.location(n) for n in names), transposed)

    def _read(self):
        import torch

        from tidar_export.export.artifact import _ir_tensor

        parts = [self.source.tensor(n) for n in self.names]
        return _ir_tensor(parts[0] if len(parts) == 1 else torch.cat(parts), self.transposed)


class _Builder:
    """One graph under construction: its bindings, nodes (an onnx_ir tape) and initializers."""

    def __init__(self, kind: str, cfg, spec, dims: dict, source, dtype: str):
        self.kind, self.cfg, self.source = kind, cfg, source
        self.dtype = dtype  # of the weights, activations and cache ("float32", "float16")
        self.tape = ir.tape.Tape()
        self.inputs = [_binding(s, dims) for s in spec.inputs]
        self.outputs = [_binding(s, dims) for s in spec.outputs]
        self.input = {v.name: v for v in self.inputs}
        self.output = {v.name: v for v in self.outputs}
        self.initializers: dict[str, ir.Value] = {}
        self.embedding_name = "lm_head.weight" if cfg.tie_word_embeddings else "model.embed_tokens.weight"
        self.rotary: tuple[ir.Value, ir.Value] | None = None  # cos, sin of this graph's positions
        self.mask: ir.Value | None = None
        self._draft_mask = None  # () -> [T, 1]: 1 on the trailing mask rows, 0 on the AR rows (`draft_mask`)
        self._draft_mask_value: ir.Value | None = None
        self.used: ir.Value | None = None  # max(cache_len) [1]: the used cache slots ("slice")
        self.lengths: list[ir.Value] = []  # seqlens_k, total_sequence_length, cos/sin tables ("gqa")

    # ----------------------------------------------------------------------- primitives

    def op(self, op_type: str, inputs, name: str, output: str | ir.Value | None = None, domain: str = "", **attrs):
        """Append one node; its output is named `output` (a name, or a binding's Value) or after the node."""
        out = output if isinstance(output, ir.Value) else ir.Value(name=output or f"{name}_output_0")
        _typed([out], op_type, inputs, attrs)
        return self.tape.op(op_type, inputs, attrs or None, domain=domain, name=name, output=out)

    def ops(self, op_type: str, inputs, name: str, outputs: list, domain: str = "", **attrs):
        """Append one node of several outputs (names or bindings' Values, as `op`)."""
        outs = [o if isinstance(o, ir.Value) else ir.Value(name=o or f"{name}_output_{i}") for i, o in enumerate(outputs)]
        _typed(outs, op_type, inputs, attrs)
        return self.tape.op_multi_out(op_type, inputs, attrs or None, domain=domain, name=name, outputs=outs)

    def const(self, name: str, array) -> ir.Value:
        """A constant initializer, made once per name (`array` None: the one made before)."""
        if name not in self.initializers:
            self._register(name, ir.tensor(np.asarray(array), name=name))
        return self.initializers[name]

    def float_const(self, name: str, t) -> ir.Value:
        """A constant of the graph's float dtype from `t` (a torch tensor or a float32 array),
        converted as torch converts it."""
        import torch

        from tidar_export.export.artifact import _ir_tensor

        if name not in self.initializers:
            t = torch.from_numpy(t) if isinstance(t, np.ndarray) else t.detach()
            tensor = _ir_tensor(t.to(getattr(torch, self.dtype)).contiguous())
            tensor.name = name
            self._register(name, tensor)
        return self.initializers[name]

    def weight(self, name: str, parts: list[str] | None = None, transposed: bool = False) -> ir.Value:
        """The initializer `name`: checkpoint tensors `parts` (default: [name]), lazily read."""
        if name not in self.initializers:
            self._register(name, _Weight(self.source, parts or [name], transposed, name))
        return self.initializers[name]

    def linear(self, x: ir.Value, module: str, parts: list[str] | None = None) -> ir.Value:
        """x @ W^T (+ bias) of the checkpoint module `module` (`parts`: modules fused into it)."""
        parts = parts or [module]
        scope = _scope(module)
        y = self.op("MatMul", [x, self.weight(f"{module}.weight.T", [f"{p}.weight" for p in parts], True)],
                    f"{scope}/MatMul")
        if f"{parts[0]}.bias" in self.source:
            y = self.op("Add", [y, self.weight(f"{module}.bias", [f"{p}.bias" for p in parts])], f"{scope}/Add")
        return y

    def rms_norm(self, x: ir.Value, module: str) -> ir.Value:
        """Opset-23 RMSNormalization over the last axis with the weight of norm `module`."""
        return self.op("RMSNormalization", [x, self.weight(f"{module}.weight")], f"{_scope(module)}/RMSNormalization",
                       axis=-1, epsilon=float(self.cfg.rms_norm_eps), stash_type=1)

    def _register(self, name: str, tensor: ir.TensorProtocol) -> None:
        self.initializers[name] = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                           const_value=tensor)

    # ----------------------------------------------------------------------- graph inputs

    def prefill_inputs(self, block_size: int) -> tuple[ir.Value, ir.Value]:
        """[prompt | M x b], the positions 0..P+b-1, the mask (prompt causal, masks see all) and
        the output rows P-1, P+1, ..., P+b-1, from the dynamic prompt length P."""
        i64 = np.int64
        ids_in = self.input["input_ids"]
        batch = self.op("Shape", [ids_in], "/Shape", start=0, end=1)
        prompt_len = self.op("Squeeze", [self.op("Shape", [ids_in], "/Shape_1", start=1, end=2)], "/Squeeze")
        fill = self.op("Expand", [self.const("mask_token", np.array(self.cfg.mask_token_id, i64)),
                                  self.op("Concat", [batch, self.const("block_size", np.array([block_size], i64))],
                                          "/Concat", axis=0)], "/Expand")
        ids = self.op("Concat", [ids_in, fill], "/Concat_1", axis=1)
        total = self.op("Add", [prompt_len, self.const("block_size_scalar", np.array(block_size, i64))], "/Add")
        slots = self.op("Range", [self.const("zero", np.array(0, i64)), total, self.const("one", np.array(1, i64))],
                        "/Range")
        keys = self.op("Unsqueeze", [slots, self.const("axis_0", np.array([0], i64))], "/Unsqueeze")  # [1, N]
        queries = self.op("Unsqueeze", [slots, self.const("axis_1", np.array([1], i64))], "/Unsqueeze_1")  # [N, 1]
        positions = self.op("Expand", [keys, self.op("Concat", [batch, self.const("axis_1", None)], "/Concat_2",
                                                     axis=0)], "/Expand_1")
        is_mask_row = self.op("GreaterOrEqual", [queries, prompt_len], "/GreaterOrEqual")  # [N, 1]
        allow = self.op("Or", [self.op("LessOrEqual", [keys, queries], "/LessOrEqual"), is_mask_row], "/Or")
        self._draft_mask = lambda: self.op("Cast", [is_mask_row], "/draft_rows/Cast", to=_DTYPES[self.dtype])
        self.mask = self.op("Unsqueeze", [allow, self.const("axes_0_1", np.array([0, 1], i64))], "/Unsqueeze_2")
        self.rotary = self._cos_sin(positions)
        rows = self.op("Add", [self.const("row_offsets", np.array(prefill_out_rows(0, block_size), i64)), prompt_len],
                       "/Add_1")
        return ids, rows

    def cached_inputs(self, kind: str, plan, form: str) -> tuple[ir.Value, ir.Value, int]:
        """The ids of a pass over the cache (the given ids, then mask tokens), its positions, mask
        or GroupQueryAttention lengths, output rows (tidar_export.model.masks), and the number
        of its trailing mask rows (where a draft adapter acts)."""
        from tidar_export.model import masks

        in_step, offsets, out_rows = masks.step_pass(plan.block_size, plan.proposals) if kind == "step" \
            else masks.ar_pass()
        i64 = np.int64
        given = self.inputs[0]
        B, S, q = plan.max_batch, plan.max_seq_len, len(offsets)
        width = given.shape[1]
        ids = given
        if q > width:
            fill = self.const("mask_tokens", np.full((B, q - width), self.cfg.mask_token_id, i64))
            ids = self.op("Concat", [given, fill], "/Concat", axis=1)
        cache_len = self.input[CACHE_LEN]
        rows = self.const("out_rows", out_rows.numpy().astype(i64))
        if form == "gqa":
            self.lengths = self._gqa_lengths(cache_len, S)
            return ids, rows, q - width
        self._draft_mask = lambda: self.float_const("draft_rows_mask",
                                                    (np.arange(q) >= width).astype(np.float32)[:, None])
        committed = self.op("Unsqueeze", [cache_len, self.const("axis_1", np.array([1], i64))], "/Unsqueeze")  # [B, 1]
        positions = self.op("Add", [committed, self.const("offsets", offsets.numpy().astype(i64)[None])], "/Add")
        self.rotary = self._cos_sin(positions)
        # key slot s of the cache is visible iff s < L; only the slots below max(L) are attended
        in_cache = self.op("Less", [self.const("slots", np.arange(S, dtype=i64)[None]), committed], "/Less")
        in_cache = self.op("Expand", [self.op("Unsqueeze", [in_cache, self.const("axes_1_2", np.array([1, 2], i64))],
                                              "/Unsqueeze_1"),
                                      self.const("mask_shape", np.array([B, 1, q, S], i64))], "/Expand")
        self.used = self.op("ReduceMax", [cache_len], "/used_cache/ReduceMax", keepdims=1)
        in_cache = self.op("Slice", [in_cache, self.const("zero_1d", np.array([0], i64)), self.used,
                                     self.const("axis_3", np.array([3], i64))], "/used_cache/mask")
        step = self.const("in_step", np.broadcast_to(in_step.numpy(), (B, 1, q, q)).copy())
        self.mask = self.op("Concat", [in_cache, step], "/Concat_1", axis=-1)
        return ids, rows, q - width

    @property
    def draft_mask(self) -> ir.Value:
        """[T, 1] in the graph's float dtype: 1 on the trailing mask rows, 0 on the AR rows; made
        the first time a draft adapter asks for it (a graph without one has no such node)."""
        if self._draft_mask_value is None:
            self._draft_mask_value = self._draft_mask()
        return self._draft_mask_value

    def _cos_sin(self, positions: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos and sin [B, T, hd/2] of the rotary angles positions * inv_freq, in float32."""
        angles = self.op("Mul", [self.op("Unsqueeze", [self.op("Cast", [positions], "/Cast", to=ir.DataType.FLOAT),
                                                        self.const("axis_2", np.array([2], np.int64))], "/Unsqueeze_3"),
                                 self.const("inv_freq", self._inv_freq())], "/Mul")
        cos, sin = self.op("Cos", [angles], "/Cos"), self.op("Sin", [angles], "/Sin")
        if self.dtype == "float32":
            return cos, sin
        to = _DTYPES[self.dtype]
        return self.op("Cast", [cos], "/Cast_cos", to=to), self.op("Cast", [sin], "/Cast_sin", to=to)

    def _inv_freq(self) -> np.ndarray:
        from tidar_export.model.transformer import inverse_frequencies

        return inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta).numpy()

    def _gqa_lengths(self, cache_len: ir.Value, slots: int) -> list[ir.Value]:
        """GroupQueryAttention's seqlens_k (each row's L, int32), total_sequence_length (max L + 1)
        and its cos/sin tables over positions 0..slots-1 (float32, as graphs/contrib.py makes them)."""
        seqlens = self.op("Cast", [cache_len], "/gqa/seqlens_k", to=ir.DataType.INT32)
        longest = self.op("ReduceMax", [seqlens], "/gqa/ReduceMax", keepdims=0)
        total = self.op("Add", [longest, self.const("gqa_one", np.array(1, np.int32))], "/gqa/total_sequence_length")
        angles = np.arange(slots, dtype=np.float32)[:, None] * self._inv_freq()[None, :]
        return [seqlens, total, self.float_const("gqa_cos_cache", np.cos(angles).astype(np.float32)),
                self.float_const("gqa_sin_cache", np.sin(angles).astype(np.float32))]

    # ----------------------------------------------------------------------- the model

    def layer(self, i: int, x: ir.Value, form: str, ad: "_Adapted | None" = None) -> ir.Value:
        """Decoder layer i: x + attention(norm(x)), then + mlp(norm(.)); its K/V to present.i.*.
        ad: the layer's draft adapter (its updates on the mask rows), or None."""
        module, scope = f"model.layers.{i}", f"/model/layers.{i}"
        adapt = ad.update if ad is not None else (lambda name, x, y: y)
        if ad is not None:
            x = ad.offset(x)
        h = self.rms_norm(x, f"{module}.input_layernorm")
        attn = f"{module}.self_attn"
        qkv = self.linear(h, f"{attn}.qkv_proj", [f"{attn}.{p}_proj" for p in "qkv"])
        if form == "gqa":  # no adapter: the AR step has no mask rows
            a = self._group_query_attention(i, qkv, scope)
        else:
            if ad is not None:
                qkv = ad.update_packed(("q_proj", "k_proj", "v_proj"), h, qkv)
            a = self._attention(i, qkv, scope, form)
        x = self.op("Add", [x, adapt("o_proj", a, self.linear(a, f"{attn}.o_proj"))], f"{scope}/Add")
        h = self.rms_norm(x, f"{module}.post_attention_layernorm")
        gate = adapt("gate_proj", h, self.linear(h, f"{module}.mlp.gate_proj"))
        silu = self.op("Mul", [gate, self.op("Sigmoid", [gate], f"{scope}/mlp/Sigmoid")], f"{scope}/mlp/Mul")
        m = self.op("Mul", [silu, adapt("up_proj", h, self.linear(h, f"{module}.mlp.up_proj"))], f"{scope}/mlp/Mul_1")
        return self.op("Add", [x, adapt("down_proj", m, self.linear(m, f"{module}.mlp.down_proj"))], f"{scope}/Add_1")

    def _heads(self, i: int, qkv: ir.Value, scope: str) -> tuple[ir.Value, ir.Value, ir.Value]:
        """q and k [B, T, N, hd] (each head normalized where the model has q/k norm) and v
        [B, T, KV * hd] from the packed projection."""
        cfg, i64, s = self.cfg, np.int64, f"{scope}/self_attn"
        H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.ops("Split", [qkv, self.const("qkv_split", np.array([H * hd, KV * hd, KV * hd], i64))],
                           f"{s}/qkv_proj/Split", [None] * 3, axis=-1)
        q = self.op("Reshape", [q, self.const("q_heads", np.array([0, -1, H, hd], i64))], f"{s}/Reshape_0")
        k = self.op("Reshape", [k, self.const("kv_heads", np.array([0, -1, KV, hd], i64))], f"{s}/Reshape_1")
        if cfg.qk_norm:
            q, k = (self.rms_norm(x, f"model.layers.{i}.self_attn.{name}_norm") for name, x in (("q", q), ("k", k)))
        return q, k, v

    def _attention(self, i: int, qkv: ir.Value, scope: str, form: str) -> ir.Value:
        """Opset-23 Attention of the rotated q over this pass's K/V (after the used cache slots
        in a "slice" graph); the new K/V are the graph's present.i.* outputs."""
        cfg, i64, s = self.cfg, np.int64, f"{scope}/self_attn"
        H, hd = cfg.num_heads, cfg.head_dim
        q, k, v = self._heads(i, qkv, scope)
        v = self.op("Reshape", [v, self.const("kv_heads", None)], f"{s}/Reshape_2")

        def heads_first(x, n, output=None):  # [B, T, N, hd] -> [B, N, T, hd]
            return self.op("Transpose", [x], f"{s}/Transpose_{n}", output=output, perm=[0, 2, 1, 3])

        cos, sin = self.rotary
        present_k, present_v = self.output[f"present.{i}.key"], self.output[f"present.{i}.value"]
        q = self.op("RotaryEmbedding", [heads_first(q, 0), cos, sin], f"{s}/RotaryEmbedding", interleaved=0)
        k = self.op("RotaryEmbedding", [heads_first(k, 1), cos, sin], f"{s}/RotaryEmbedding_1",
                    output=present_k, interleaved=0)
        v = heads_first(v, 2, output=present_v)
        if form == "slice":
            past = [self.input[f"past_key_values.{i}.{t}"] for t in ("key", "value")]
            used = [self.op("Slice", [p, self.const("zero_1d", None), self.used, self.const("axis_2", None)],
                            f"{p.name}/used") for p in past]
            k = self.op("Concat", [used[0], k], f"{s}/Concat", axis=2)
            v = self.op("Concat", [used[1], v], f"{s}/Concat_1", axis=2)
        out = self.op("Attention", [q, k, v, self.mask], f"{s}/Attention", scale=_scale(hd))
        out = self.op("Transpose", [out], f"{s}/Transpose_3", perm=[0, 2, 1, 3])
        return self.op("Reshape", [out, self.const("flat_heads", np.array([0, -1, H * hd], i64))], f"{s}/Reshape_3")

    def _group_query_attention(self, i: int, qkv: ir.Value, scope: str) -> ir.Value:
        """ONNX Runtime's GroupQueryAttention on the packed q/k/v (or, with q/k norm, q, k and v
        apart, q and k normalized per head), rotating q and k itself and writing the new K/V into
        the cache it shares with present.i.* (graphs/contrib.py)."""
        cfg = self.cfg
        past = [self.input[f"past_key_values.{i}.{t}"] for t in ("key", "value")]
        present = [self.output[f"present.{i}.{t}"] for t in ("key", "value")]
        qkv = [qkv, None, None]
        if cfg.qk_norm:
            q, k, v = self._heads(i, qkv[0], scope)
            flat = self.const("flat_heads_3d", np.array([0, 0, -1], np.int64))
            qkv = [self.op("Reshape", [x, flat], f"{scope}/self_attn/{name}_norm/Reshape")
                   for name, x in (("q", q), ("k", k))] + [v]
        out, _, _ = self.ops("GroupQueryAttention", [*qkv, *past, *self.lengths],
                             f"{scope}/self_attn/GroupQueryAttention", [None, *present], domain=MS_DOMAIN,
                             num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=1,
                             rotary_interleaved=0, scale=_scale(cfg.head_dim))
        return out

    def head(self, x: ir.Value, rows: ir.Value) -> None:
        """Final norm, the output rows, the LM head (float32 logits) and their argmax."""
        h = self.rms_norm(x, "model.norm")
        if rows.const_value is None:  # the prefill's rows follow the prompt length
            rows = self.op("Reshape", [rows, self.const("flat", np.array([-1], np.int64))], "/Reshape")
        h = self.op("Gather", [h, rows], "/Gather", axis=1)
        if self.cfg.tie_word_embeddings:
            w = self.op("Transpose", [self.weight("lm_head.weight")], "/lm_head/Transpose", output="lm_head.weight.T",
                        perm=[1, 0])
        else:
            w = self.weight("lm_head.weight.T", ["lm_head.weight"], True)
        if self.dtype == "float32":
            logits = self.op("MatMul", [h, w], "/lm_head/MatMul", output=self.output["logits"])
        else:  # float32 logits, whatever the model's dtype
            logits = self.op("Cast", [self.op("MatMul", [h, w], "/lm_head/MatMul")], "/Cast_logits",
                             output=self.output["logits"], to=ir.DataType.FLOAT)
        self.op("ArgMax", [logits], "/ArgMax", output=self.output["token_ids"], axis=-1, keepdims=0,
                select_last_index=0)

    def model(self, form: str) -> ir.Model:
        opsets = {"": OPSET} | ({MS_DOMAIN: 1} if form == "gqa" else {})
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.tape.nodes, initializers=list(self.initializers.values()),
                         opset_imports=opsets, name=self.kind)
        model = ir.Model(graph, ir_version=_ir_version(opsets), producer_name="tidar_export.direct")
        model.metadata_props["tidar_graphs.target"] = "ort"
        return model


class _Adapted:
    """A draft adapter's layer in a graph under construction: its low-rank updates and offset on
    the trailing mask rows. The traced graphs (tidar_export.model.adapter) slice those rows out,
    update them and concatenate them back: seven nodes per projection, about 1,300 per
    30-layer graph, which cost ORT's CPU provider more than the updates' arithmetic. Here the
    update runs on every row with its rank-r middle multiplied by the graph's row mask
    (`_Builder.draft_mask`: 1 on mask rows, 0 on AR rows): y + ((x @ A^T) * mask) @ (scale * B^T),
    four nodes, and an AR row's update is exactly 0 (its projection's output is unchanged
    bit for bit). The packed q/k/v projection gets one update with the three A^T side by side
    and the three B^T on a block diagonal."""

    def __init__(self, builder: _Builder, layer_adapter, i: int):
        self.b, self.ad, self.i = builder, layer_adapter, i

    def _low_rank(self, x: ir.Value, a, bt, scope: str) -> ir.Value:
        """((x @ a) * draft_mask) @ bt: the update of every row, zero on the AR rows."""
        b = self.b
        middle = b.op("Mul", [b.op("MatMul", [x, b.float_const(f"adapter.layers.{self.i}.{scope}.A", a)],
                                   f"/adapter/layers.{self.i}/{scope}/MatMul"), b.draft_mask],
                      f"/adapter/layers.{self.i}/{scope}/Mul")
        return b.op("MatMul", [middle, b.float_const(f"adapter.layers.{self.i}.{scope}.B", bt)],
                    f"/adapter/layers.{self.i}/{scope}/MatMul_1")

    def update(self, name: str, x: ir.Value, y: ir.Value) -> ir.Value:
        """y = projection `name` of x, plus its update on the mask rows (adapter.LayerAdapter.update)."""
        lr = getattr(self.ad, name, None)
        if lr is None:
            return y
        low = self._low_rank(x, lr.lora_A.t(), lr.lora_B.t() * lr.scale, name)
        return self.b.op("Add", [y, low], f"/adapter/layers.{self.i}/{name}/Add")

    def update_packed(self, names: tuple[str, ...], x: ir.Value, y: ir.Value) -> ir.Value:
        """y = the packed projections `names` of x (their outputs side by side), plus their updates."""
        import torch

        lrs = [getattr(self.ad, n, None) for n in names]
        if all(lr is None for lr in lrs):
            return y
        cfg = self.b.cfg
        r = next(lr for lr in lrs if lr is not None).lora_A.shape[0]  # the adapter's rank
        widths = [(cfg.num_heads if n == "q_proj" else cfg.num_kv_heads) * cfg.head_dim for n in names]
        a = torch.zeros(cfg.hidden_size, r * len(names))
        bt = torch.zeros(r * len(names), sum(widths))
        col = 0
        for j, (lr, width) in enumerate(zip(lrs, widths)):
            if lr is not None:
                a[:, j * r:(j + 1) * r] = lr.lora_A.detach().float().t()
                bt[j * r:(j + 1) * r, col:col + width] = lr.lora_B.detach().float().t() * lr.scale
            col += width
        scope = "".join(n.removesuffix("_proj") for n in names) + "_proj"  # "qkv_proj", as the packed base
        return self.b.op("Add", [y, self._low_rank(x, a, bt, scope)], f"/adapter/layers.{self.i}/{scope}/Add")

    def offset(self, x: ir.Value) -> ir.Value:
        """x plus the adapter's learned offset on the mask rows (its first layer only)."""
        if self.ad.embed_offset is None:
            return x
        b, scope = self.b, f"/adapter/layers.{self.i}/embed_offset"
        rows = b.op("Mul", [b.draft_mask, b.float_const(f"adapter.layers.{self.i}.embed_offset", self.ad.embed_offset)],
                    f"{scope}/Mul")
        return b.op("Add", [x, rows], f"{scope}/Add")


_BOOL_OPS = ("Less", "LessOrEqual", "GreaterOrEqual", "Or")


def _typed(outputs: list[ir.Value], op_type: str, inputs, attrs: dict) -> None:
    """Give a node's untyped outputs their element type (the graph then records every value's
    type, as a traced graph does, for tools that read it: `tidar-export compare --localize`).
    Every node here yields its first input's type, except these."""
    if op_type in ("Shape", "ArgMax"):
        dtype = ir.DataType.INT64
    elif op_type == "Cast":
        dtype = ir.DataType(attrs["to"])
    elif op_type in _BOOL_OPS:
        dtype = ir.DataType.BOOL
    else:
        dtype = inputs[0].dtype
    for out in outputs:
        if out.dtype is None:
            out.dtype = dtype


def _binding(spec, dims: dict) -> ir.Value:
    """A graph input or output of the manifest's TensorSpec: its name, dtype and (named) dims."""
    shape = []
    for want in spec.shape:
        value = want if isinstance(want, int) else dims[want]
        shape.append(ir.SymbolicDim(want) if value is None else value)
    return ir.Value(name=spec.name, shape=ir.Shape(shape), type=ir.TensorType(_DTYPES[spec.dtype]))


def _scope(module: str) -> str:
    """The node scope of a checkpoint module, as the tracer names it ("model.layers.0.mlp" -> "/model/layers.0/mlp")."""
    return "/" + module.replace(".", "/").replace("layers/", "layers.")


def _scale(head_dim: int) -> float:
    return float(np.float32(1.0 / math.sqrt(head_dim)))


def _ir_version(opsets: dict[str, int]) -> int:
    """The IR version these opsets need (as `tidar_graphs.lower` sets it)."""
    import onnx

    imports = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    return max(10, onnx.helper.find_min_ir_version_for(imports, ignore_unknown=True))
