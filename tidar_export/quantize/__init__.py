"""`tidar-export quantize`: quantized artifacts (docs/QUANTIZATION.md).

    tidar-export quantize ARTIFACT -o QUANTIZED --precision int8|fp8|int4|int8-wo [--calibration FILE]

Two families, both calibrated on the real inputs of greedy TiDAR *and* AR decodes of the
calibration prompts (the fp32 artifact in ONNX Runtime; a reservoir keeps at most `samples`
inputs per graph):

- int8 / fp8 (E4M3): explicit Q/DQ on both inputs of every linear layer's MatMul (q/k/v/o,
  gate/up/down; in the ort target's graphs q/k/v and gate/up are one MatMul each, whose output
  columns are the parts' columns, so per-channel scales carry over). Weights per output channel, activations per tensor, symmetric (zero point 0,
  TensorRT's requirement). ONE set of parameters per artifact: an activation's scale belongs to
  its tensor role (the linear layer reading it, a module path that is the same in the three
  graphs) and is calibrated over the inputs of prefill, step and ar_step together, so the AR
  rows inside the TiDAR step see exactly the quantizer `--mode ar` sees. Ranges: max |x|
  (default) or a percentile of |x|; scale = range / 127 (int8) or / 448 (E4M3's largest value).
- int4 / int8-wo: weight-only, block-wise along the input dimension (blocks of 32/64/128),
  symmetric; RTN or an AWQ-style per-channel scale search (s = mean|x|^alpha, alpha picked per
  layer group on calibration rows, 1/s folded into the RMSNorm weight / up_proj / v_proj before
  it; in the ort target's fused gate_up / qkv weights, into their up / v columns). The embedding table and LM head are quantized too (they are a third of the demo model).
  Lowered per target: `ort` -> com.microsoft MatMulNBits (GatherBlockQuantized for the
  embedding); TensorRT targets -> block-quantized INT4 DequantizeLinear on the weights (opset
  21+: trt-10.15; refused for trt-10.3, whose parser reads opsets up to 20).

Modules: `calibration` (prompts, recorded decode inputs), `graph` (the graphs' linear layers and
tables, protobuf edits), `stats` (activation statistics), `qdq` (int8 / fp8), `weight_only` (block
quantization, MatMulNBits / DequantizeLinear), `awq` (the scale search and folds), `artifact` (the
command's work, the recipe), `metrics` (agreement with the float artifact).

The three graphs share one `weights.bin` (export.WeightFile: a quantized weight used by several
graphs is stored once); the manifest says `precision: <p>` and names `<kind>.<p>.onnx`;
`quantization.json` beside it records the recipe. Graph inputs and outputs keep their dtypes.
"""

from tidar_export.quantize.calibration import (  # noqa: F401 (the package's API)
    DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_NEW_TOKENS, DEFAULT_CALIBRATION_PROMPTS, DEFAULT_SAMPLES,
    PROMPT_SEPARATOR, RecordingBackend, collect_calibration_inputs, fit_prompts, full_feed, read_prompt_file,
    tokenize_prompts,
)
from tidar_export.quantize.graph import (  # noqa: F401 (the package's API)
    EXCLUDED_SCOPES, Linear, TableUse, activation_roles, drop_unused, initializer_array,
    insert_before, linear_layers, quantized_nodes, replace_initializer, table_use, tensor_proto,
)
from tidar_export.quantize.stats import (  # noqa: F401 (the package's API)
    AWQ_ROWS, ActStats, HIST_BINS, activation_stats,
)
from tidar_export.quantize.qdq import (  # noqa: F401 (the package's API)
    DEFAULT_INT8_METHOD, DEFAULT_PERCENTILE, FP8_MIN_OPSET, INT8_METHODS, QMAX, activation_scales,
    keep_bias_adds_unfused, qdq_graph,
)
from tidar_export.quantize.weight_only import (  # noqa: F401 (the package's API)
    AWQ_ALPHAS, BLOCK_DQ_MIN_OPSET, BLOCK_SIZES, DEFAULT_BLOCK_SIZE, WEIGHT_ONLY_BITS, WO_METHODS,
    block_dequantize, block_quantize, block_quantize_minmax, externalize_packed, unshare_weights, weight_only_graph,
)
from tidar_export.quantize.awq import (  # noqa: F401 (the package's API)
    AwqGroup, awq_folded_weights, awq_groups, awq_search, output_bias, output_columns,
    value_cache_scales,
)
from tidar_export.quantize.artifact import (  # noqa: F401 (the package's API)
    QUANTIZER_VERSION, SIDECAR, default_method, quantize_artifact, quantize_graph,
)
from tidar_export.quantize.metrics import (  # noqa: F401 (the package's API)
    AGREEMENT_WARNING, agreement_with_source, common_prefix, greedy_agreement, teacher_forced,
    teacher_forced_ar_loss, token_agreement,
)
