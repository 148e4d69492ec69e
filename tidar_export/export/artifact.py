"""`tidar-export export`: write a deployable artifact directory (docs/EXPORT.md).

    manifest.json   prefill.onnx   step.onnx   ar_step.onnx   weights.bin   [tokenizer.json]   [chat_template.jinja]

The three graphs are built directly for the ort target (tidar_export.export.direct; the
`builder` option), else traced by tidar_export.export.tracing and lowered for the target by
`tidar_graphs.lower`, each from the model's first two layers, whose last layer is then repeated
for the others (tidar_export.export.layers; a graph it does not recognise is traced whole). Weights: every initializer of at least EXTERNAL_MIN_BYTES goes to
weights.bin, once per distinct content (the three graphs point at the same offsets), so models
over 2 GB work and the data is stored once. The checkpoint's tensors are streamed: the traced
model holds no weight data, and each tensor is read from its shard (transposed where the
graph wants [in, out]) only when it is written to weights.bin, so the export holds about one
tensor at a time, never the whole model (`_streamed_weights`). The artifact is written into a
staging directory beside the target and renamed at the end (tidar_runtime.fileio); any failure removes it.

Heavy imports (torch, onnx) happen inside the functions, so that the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tidar_runtime import fileio
from tidar_runtime.chat import CHAT_TEMPLATE_FILE
from tidar_runtime.contract import MANIFEST_FILE
from tidar_runtime.paths import checkpoint_root, confined

WEIGHTS_FILE = "weights.bin"
BUILDERS = ("auto", "direct", "trace")  # how export_artifact makes the graphs (its `builder`)
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the graph (shapes, axes, small masks)


# --------------------------------------------------------------------------- weights


class WeightFile:
    """One external-data file shared by every graph of an artifact; each distinct tensor once.

    Tensors are keyed by (dtype, shape, BLAKE2 digest of the bytes), so the same weight traced
    into three graphs, or a copy that a graph pass made, is written only once.
    """

    ALIGN = 64  # bytes, every tensor
    ALIGN_LARGE = 65536  # tensors >= 1 MiB start on a 64 KiB boundary (mmap-friendly on every OS)

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.name = path.name
        self._f = open(path, "wb")
        self._offsets: dict[tuple, tuple[int, int]] = {}
        self._sources: dict[tuple, tuple[int, int]] = {}  # source_key of a streamed tensor -> (offset, length)
        self._digest = hashlib.blake2b(digest_size=16)  # of every byte written: the manifest's digest
        self.size = 0

    def add(self, dtype: int, shape: tuple[int, ...], data: np.ndarray, source_key=None) -> tuple[int, int]:
        """Append the bytes of `data` unless already present; returns (offset, length).

        source_key: where a checkpoint tensor comes from; a tensor of 1 MiB or more with one is
        known by it instead of a digest of its bytes (hashing every large weight twice, here and
        for the manifest, cost seconds of an export)."""
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        large = buf.nbytes >= 1 << 20
        content = ("source", source_key) if large and source_key is not None else \
            hashlib.blake2b(buf, digest_size=20).digest()
        key = (dtype, tuple(shape), content)
        if key not in self._offsets:
            align = self.ALIGN_LARGE if large else self.ALIGN
            offset = -(-self.size // align) * align
            if offset > self.size:
                self._write(b"\0" * (offset - self.size))
            self._write(buf)
            self.size = offset + buf.nbytes
            self._offsets[key] = (offset, buf.nbytes)
        return self._offsets[key]

    def _write(self, data) -> None:
        self._f.write(data)
        self._digest.update(data)

    def hexdigest(self) -> str:
        """BLAKE2b-128 of the file as written so far (what `manifest.file_digest` reads back)."""
        return self._digest.hexdigest()

    def externalize_ir(self, model) -> None:
        """Move every large initializer of an onnx_ir Model into the file (before lowering).

        Until `externalize_proto` the references carry the file's absolute path, so that a graph
        pass that reads a weight finds it whatever its working directory (a ModelProto has no
        base directory); `externalize_proto` turns them into the artifact-relative name.
        """
        import onnx_ir as ir

        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or isinstance(t, ir.ExternalTensor) or t.nbytes < EXTERNAL_MIN_BYTES:
                continue
            key = getattr(t, "source_key", None)  # a streamed checkpoint tensor: read it once for all graphs
            if key is not None and key in self._sources:
                offset, length = self._sources[key]
            else:
                offset, length = self.add(t.dtype.value, tuple(t.shape.numpy()), t.numpy(), key)
                if key is not None:
                    self._sources[key] = (offset, length)
            value.const_value = ir.ExternalTensor(str(self.path), offset, length, t.dtype, shape=t.shape,
                                                  name=value.name)
        self._f.flush()

    def externalize_proto(self, model) -> None:
        """After lowering: make every external reference relative to the artifact, and move the
        large initializers that lowering added into the file."""
        import onnx
        import onnx.external_data_helper
        import onnx.numpy_helper

        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entry = next((e for e in tensor.external_data if e.key == "location"), None)
                if entry is None or entry.value not in (str(self.path), self.name):
                    raise RuntimeError(f"initializer {tensor.name} points at "
                                       f"{entry.value if entry else None!r}, not at {self.name}")
                entry.value = self.name
                continue
            array = onnx.numpy_helper.to_array(tensor)
            if array.nbytes < EXTERNAL_MIN_BYTES:
                continue
            self.point_at(tensor, *self.add(tensor.data_type, tuple(tensor.dims), array))

    def point_at(self, tensor, offset: int, length: int) -> None:
        """Make the TensorProto `tensor` an external reference to bytes offset..offset+length of
        this file, dropping its inline values."""
        import onnx

        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        # Written by hand: onnx's set_external_data refuses a tensor without raw_data, and an
        # initializer may hold its values in float_data etc. (or its raw_data is cleared above).
        del tensor.external_data[:]
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def close(self) -> None:
        self._f.close()


def _streamed_weights(source, weights: WeightFile, target: str):
    """The `prepare` hook of `tracing.trace` for a model of `checkpoint.open_streamed`.

    Its parameters are placeholders without data, so before torch.onnx's optimizer runs (it
    would fold the weight transposes over them), every initializer that names a checkpoint
    tensor gets a lazy value that reads the tensor from its shard; a Transpose of such a weight
    (nn.Linear's [out, in] -> [in, out]) becomes a lazy initializer that reads and transposes.
    The target's weight passes run on those lazy values (`tidar_graphs.prepare_weights`: the
    ort target's fused q/k/v weight replaces its parts, which are then never read).
    Then all of them go to the weights file, one tensor in memory at a time; the optimizer and
    the graph passes only ever see references into that file.
    """
    import onnx_ir as ir
    import tidar_graphs
    import torch

    from tidar_export.export.layers import layer_name

    ir_dtype = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                torch.bfloat16: ir.DataType.BFLOAT16}[source.dtype]

    class ShardTensor(ir.LazyTensor):
        def __init__(self, name: str, transposed: bool):
            shape = tuple(source.tensor_shape(name))
            shape = shape[::-1] if transposed else shape
            super().__init__(lambda: _ir_tensor(source.tensor(name), transposed), dtype=ir_dtype,
                             shape=ir.Shape(shape), name=name + (".T" if transposed else ""))
            self.source_key = (*source.location(name), transposed)
            self.source_name, self.transposed = name, transposed

    recipes: dict[str, ir.TensorProtocol] = {}  # initializer name -> its lazy tensor, before it is written

    def relayered(tensor, k: int):
        """The same lazy tensor made from layer k's checkpoint tensors (None: not a checkpoint weight)."""
        if isinstance(tensor, ShardTensor):
            name = layer_name(tensor.source_name, k)
            return ShardTensor(name, tensor.transposed) if name in source else None
        parts = getattr(tensor, "parts", None)  # tidar_graphs' fused q/k/v weight
        if parts is not None:
            new = [relayered(t, k) for t in parts]
            return None if None in new else type(tensor)(new, layer_name(tensor.name, k))
        return None

    def layer_weight(value, k: int):
        """Layer k's tensor for layer 1's initializer `value` (`layers.repeat_last_layer`)."""
        recipe = recipes.get(value.name)
        return None if recipe is None else relayered(recipe, k)

    def prepare(model) -> None:
        g = model.graph
        for node in list(g):
            src = node.inputs[0] if node.inputs else None
            perm = node.attributes.get("perm")
            if (node.op_type != "Transpose" or node.domain != "" or src is None or not src.is_initializer()
                    or src.name not in source or perm is None or tuple(perm.as_ints()) != (1, 0)
                    or node.outputs[0].is_graph_output() or len(src.uses()) != 1):
                # a weight used elsewhere too (a tied embedding's Gather) keeps its Transpose: no second copy
                continue
            out = node.outputs[0]
            name = out.name
            lazy = ShardTensor(src.name, True)
            value = ir.Value(name=f"{name}.streamed", shape=lazy.shape, type=ir.TensorType(ir_dtype), const_value=lazy)
            out.replace_all_uses_with(value)
            g.remove(node, safe=True)
            value.name = name
            g.register_initializer(value)
            if not src.uses():
                del g.initializers[src.name]
        for value in g.initializers.values():
            if value.name in source and not isinstance(value.const_value, ShardTensor):
                value.const_value = ShardTensor(value.name, False)
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.numel() > 1 and not any(raw.stride()):
                # a placeholder no checkpoint tensor replaced: exporting it would write a constant weight
                raise RuntimeError(f"initializer {value.name} is a weight placeholder with no checkpoint tensor")
        tidar_graphs.prepare_weights(model, target)
        recipes.update((v.name, v.const_value) for v in g.initializers.values() if v.const_value is not None)
        weights.externalize_ir(model)

    prepare.layer_weight = layer_weight
    return prepare


def _ir_tensor(t, transposed: bool = False):
    """An onnx_ir tensor of the torch tensor `t` (transposed first where asked; bf16 through ml_dtypes)."""
    import onnx_ir as ir
    import torch

    if transposed:
        t = t.t().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), dtype=ir.DataType.BFLOAT16)
    return ir.Tensor(t.numpy())


def _traced_and_lowered(model, plan, kind: str, spec, source, weights: WeightFile):
    """Graph `kind` traced and lowered for the plan's target, its weights in `weights`, and how it
    was made: from a two-layer template whose last layer is repeated (`layers`), or traced whole
    for a model of at most two layers, a model with a draft adapter (its layers differ: the
    template carries none), or a graph the repetition does not recognise. `spec`: the graph's
    entry of the manifest, whose bindings the repeated graph must have."""
    import logging

    import onnx_ir as ir

    from tidar_export.export import layers
    from tidar_export.export.tracing import trace

    n = model.cfg.num_layers
    if n > layers.TEMPLATE_LAYERS and model.adapter is None:
        prepare = _streamed_weights(source, weights, plan.target)
        lowered = _lower(trace(layers.first_layers(model), plan, kind, prepare=prepare), plan, kind, weights)
        graph = ir.serde.deserialize_model(lowered)
        try:
            layers.repeat_last_layer(graph, n, prepare.layer_weight)
            names = [[v.name for v in values] for values in (graph.graph.inputs, graph.graph.outputs)]
            want = [[t.name for t in specs] for specs in (spec.inputs, spec.outputs)]
            if names != want:
                raise layers.CannotRepeat(f"the repeated graph's bindings {names} are not the manifest's {want}")
        except layers.CannotRepeat as e:
            logging.getLogger(__name__).warning("%s: tracing all %d layers (%s)", kind, n, e)
        else:
            weights.externalize_ir(graph)
            proto = ir.serde.serialize_model(graph)
            proto.ir_version = lowered.ir_version
            return proto, f"{layers.TEMPLATE_LAYERS} layers traced, repeated to {n}"
    prepare = _streamed_weights(source, weights, plan.target)
    return _lower(trace(model, plan, kind, prepare=prepare), plan, kind, weights), f"{n} layers traced"


def _lower(traced, plan, kind: str, weights: WeightFile):
    """A traced onnx_ir model, its weights written, lowered for the plan's target (a ModelProto)."""
    import onnx_ir as ir
    import tidar_graphs

    weights.externalize_ir(traced)
    return tidar_graphs.lower(ir.serde.serialize_model(traced), plan.target, kind, plan.ar_step)


def _use_direct(builder: str, cfg, plan, log) -> bool:
    """Whether to build the graphs directly (`export_artifact`'s builder option)."""
    from tidar_export.errors import TiDARError
    from tidar_export.export.direct import unsupported

    if builder not in BUILDERS:
        raise TiDARError(f"unknown builder {builder!r}: choose one of {', '.join(BUILDERS)}")
    if builder == "trace":
        return False
    why = unsupported(cfg, plan)
    if why is not None and builder == "direct":
        raise TiDARError(f"--builder direct does not cover this export: {why}")
    if why is not None:
        log(f"tracing the graphs: the direct builder does not cover {why}")
    return why is None


def _built(plan, kind: str, spec, dims: dict, model, source, weights: WeightFile):
    """Graph `kind` built directly (tidar_export.export.direct), its weights in `weights` (a ModelProto)."""
    import onnx_ir as ir

    from tidar_export.export.direct import build_graph

    graph = build_graph(kind, model.cfg, plan, spec, dims, source, model.adapter)
    weights.externalize_ir(graph)
    return ir.serde.serialize_model(graph)


# --------------------------------------------------------------------------- artifact


def prepare_output(output: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """The artifact folder `output` stands for, checked by the one output policy
    (`tidar_runtime.fileio.prepare_output`) before any work."""
    return fileio.prepare_output(output, "artifact", force, inputs)


def export_artifact(checkpoint: str | os.PathLike, output: str | os.PathLike, *, block_size: int | None = None,
                    proposals: Sequence[int] | None = None, target: str = "ort", precision: str = "fp32",
                    max_seq_len: int | None = None, max_batch: int = 1, mask_token_id: int | None = None,
                    ar_step: str = "gqa", builder: str = "auto", log=None, force: bool = False) -> Path:
    """Export a checkpoint folder to an artifact directory (atomically: temp dir, then rename).

    An existing artifact directory at `output` is replaced; any other non-empty folder is refused
    unless `force` (fileio.prepare_output).

    builder (BUILDERS): "direct" writes the graphs node by node (tidar_export.export.direct),
    "trace" traces and lowers them, "auto" builds directly where the direct builder covers the
    export and traces otherwise (one log line says why).
    """
    import dataclasses

    import onnx
    import onnx_ir as ir
    import torch

    import tidar_export
    from tidar_export.export.plan import make_plan
    from tidar_export.export.tracing import EXPORT_OPSET, torch_dtype
    from tidar_export.model.adapter import describe as describe_adapter
    from tidar_export.model.checkpoint import open_streamed, read_config

    log = log or (lambda msg: None)
    output = prepare_output(output, force, inputs=[checkpoint])
    cfg = read_config(checkpoint, block_size, mask_token_id)
    plan = make_plan(cfg, block_size, proposals, target, precision, max_seq_len, max_batch, ar_step)  # before loading
    model, source = open_streamed(checkpoint, block_size, mask_token_id, dtype=torch_dtype(plan.precision))
    manifest = plan.manifest(dataclasses.asdict(cfg))
    direct = _use_direct(builder, cfg, plan, log)

    with staged_artifact(output, force) as (tmp, weights):
        opsets: dict[str, int] = {}
        for kind, spec in manifest.graphs.items():
            t0 = time.perf_counter()
            if direct:
                lowered, how = _built(plan, kind, spec, manifest.dims, model, source, weights), "built directly"
            else:
                lowered, how = _traced_and_lowered(model, plan, kind, spec, source, weights)
                how = f"traced and lowered ({how})"
            weights.externalize_proto(lowered)
            onnx.save_model(lowered, str(tmp / spec.file))
            opsets.update({imp.domain or "ai.onnx": imp.version for imp in lowered.opset_import})
            spec.bytes = (tmp / spec.file).stat().st_size
            log(f"{kind}: {how} for {target} in {time.perf_counter() - t0:.1f}s")
        weights.close()
        for key, name in (("file", "tokenizer.json"), ("chat_template", CHAT_TEMPLATE_FILE)):
            src = confined(checkpoint, name, f"{checkpoint}: tokenizer", root=checkpoint_root(checkpoint))
            if src.is_file():
                shutil.copyfile(src, tmp / name)
                manifest.tokenizer[key] = name
        manifest.versions = {
            "tidar_export": tidar_export.__version__,
            "exporter": "tidar_export.export.direct" if direct else "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__,
            "onnx_ir": ir.__version__,
            "export_opset": EXPORT_OPSET,
            "opsets": opsets,
        }
        manifest.weights = {"file": WEIGHTS_FILE, "bytes": weights.size}
        manifest.adapter = describe_adapter(model.adapter) if model.adapter is not None else {}
        manifest.save(tmp)
    return output


@contextlib.contextmanager
def staged_artifact(output: str | os.PathLike, force: bool = False) -> Iterator[tuple[Path, WeightFile]]:
    """A staging folder beside `output` with its open weights file, for the body to fill (it closes
    the weights file and saves the manifest there). When the body returns, the digests are
    recorded in the manifest (`seal`), and the folder gets the usual permissions and replaces
    `output` (`fileio.publish_dir`); when it raises, the folder is removed."""
    output = fileio.resolve_output(output)
    tmp = fileio.staging_dir(output)
    weights = None
    try:
        weights = WeightFile(tmp / WEIGHTS_FILE)
        yield tmp, weights
        seal(tmp, weights.hexdigest())
        fileio.publish_dir(tmp, output, "artifact", force)
    except BaseException:
        if weights is not None:
            weights.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal(folder: Path, weights_digest: str | None = None) -> None:
    """Record the BLAKE2b digests of the graphs, weights, tokenizer and chat template (and the tokenizer's vocabulary size) in the manifest of a finished
    artifact folder, and read it back through the full validation (`load_manifest`).
    weights_digest: the weights file's digest where the writer knows it (else it is read)."""
    from tidar_runtime.manifest import TOKENIZER_DIGESTS, Manifest, file_digest, load_manifest, read_json, sample_digest

    m = Manifest.from_dict(read_json(folder / MANIFEST_FILE))
    for g in m.graphs.values():
        g.digest = file_digest(folder / g.file)
    if m.weights:
        w = folder / m.weights["file"]
        m.weights.update(bytes=w.stat().st_size, blake2b=weights_digest or file_digest(w), sample_blake2b=sample_digest(w))
    for key, digest in TOKENIZER_DIGESTS.items():  # tokenizer.json, chat_template.jinja
        if m.tokenizer.get(key):
            m.tokenizer[digest] = file_digest(folder / m.tokenizer[key])
    if m.tokenizer.get("file"):
        from tidar_runtime.tokenizer import load_tokenizer

        m.tokenizer["vocab_size"] = load_tokenizer(folder / m.tokenizer["file"]).get_vocab_size(with_added_tokens=True)
    m.save(folder)
    load_manifest(folder, verify="full")


# --------------------------------------------------------------------------- command line


def print_written(what: str, out: Path, t0: float) -> None:
    """The commands' last line: `what` artifact, its size, where, and the seconds since `t0`."""
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {what} artifact ({size / 2**20:.1f} MiB) to {out} in {time.perf_counter() - t0:.1f}s")
