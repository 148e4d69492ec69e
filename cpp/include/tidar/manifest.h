// The manifest: an artifact's manifest.json (format version 2), read and checked as
// runtime/manifest.py reads and checks it (the same bounds, confined paths, digests and one-line
// errors). Each fact is recorded once in the file (dims, export, model, tokenizer, per-graph
// kv_update, rows and bindings); validate() reads each in one place and checks every graph's
// bindings and rows against the contract's tables (layout.h). The struct below holds the facts
// under the names the code uses, as the Python Manifest's properties do.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tidar/layout.h"
#include "tidar/pyfmt.h"

namespace tidar {

inline constexpr const char* kManifestFormat = "tidar-manifest";
inline constexpr int kManifestVersion = 2;
inline constexpr const char* kManifestFile = "manifest.json";
inline const std::vector<std::string> kGraphKinds = {"prefill", "step", "ar_step"};

struct GraphSpec {
  std::string kind;  // prefill | step | ar_step
  std::string file;  // ONNX file, relative to the artifact directory
  std::optional<std::string> kv_update;  // "slice" | "inplace"; none for the prefill (no cache input)
  std::vector<Row> rows;                  // what each output row predicts
  std::vector<TensorSpec> inputs, outputs;
  std::optional<std::string> engine;  // TensorRT engine file, once built
  std::optional<std::int64_t> bytes;  // size of `file` as written
  std::optional<std::string> digest;  // BLAKE2b-128 of `file`

  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

struct Manifest {
  // dims: every named dim of the graphs' shapes; nullopt for the prefill's dynamic ones
  std::map<std::string, std::optional<std::int64_t>> dims;
  int block_size = 0, max_seq_len = 0, max_batch = 0, step_len = 0, n_out = 0;  // dims block_size .. q_len, n_out
  std::int64_t vocab_size = 0, num_layers = 0, num_kv_heads = 0, head_dim = 0;   // dims vocab .. head_dim
  // export
  std::string target, precision, ar_step;
  std::vector<int> proposals;
  std::int64_t mask_token_id = 0;
  Json model;  // the rest of the model config (informational)
  std::map<std::string, GraphSpec> graphs;  // by kind
  std::vector<std::string> graph_order;     // kinds in the manifest's order (file checks follow it)
  // tokenizer
  std::optional<std::string> tokenizer_file, chat_template, tokenizer_blake2b, chat_template_blake2b;
  std::optional<std::int64_t> bos_token_id;
  std::vector<std::int64_t> eos_ids;  // eos_token_id as a list (an id or a list of ids; empty when none)
  // weights
  std::optional<std::string> weights_file, weights_blake2b, weights_sample_blake2b;
  std::int64_t weights_bytes = 0;
  Json raw;  // the parsed manifest, for informational fields (versions, tuning, adapter)

  /// How graph `kind` writes the cache ("slice" or "inplace"); "" for the prefill.
  std::string kv_update_of(const std::string& kind) const;
  /// A shape with its named dims resolved; nullopt entries are dynamic.
  std::vector<std::optional<std::int64_t>> resolve(const std::vector<Dim>& shape) const;
};

enum class Verify { none, quick, full };

/// Type and bound checks of a parsed manifest, every graph's bindings and rows against the
/// contract; `where` prefixes every message. Throws Error.
Manifest validate(const Json& d, const std::string& where);

/// Read and check `artifact_dir`/manifest.json (manifest.py load_manifest): bounded JSON, format
/// and version (another version says to re-export), every field, confined file names, the files'
/// sizes, and digests (quick: graphs, tokenizer, chat template and the weights' sample; full: the
/// whole weights file too).
Manifest load_manifest(const std::string& artifact_dir, Verify verify = Verify::quick);

/// manifest.py check_name: `name` if it is a plain relative file name, else Error.
std::string check_name(const Json& name, const std::string& what);

/// A path as Python's str(Path(p)) shows it ("a//b/./c/" -> "a/b/c").
std::string py_path(const std::string& p);

}  // namespace tidar
