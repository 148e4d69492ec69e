// The manifest: an artifact's manifest.json, read and checked as runtime/manifest.py reads and
// checks it (the same bounds, confined paths, digests and one-line errors). Each field is read in
// one place: validate() below, which fills the struct as it checks.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "tidar/pyfmt.h"

namespace tidar {

inline constexpr const char* kManifestFormat = "tidar-manifest";
inline constexpr int kManifestVersion = 1;
inline constexpr const char* kManifestFile = "manifest.json";
inline const std::vector<std::string> kGraphKinds = {"prefill", "step", "ar_step"};

using Dim = std::variant<std::int64_t, std::string>;  // a static size, or the name of an entry of dims

struct TensorSpec {
  std::string name;   // binding name, e.g. "past_key_values.0.key"
  std::string dtype;  // numpy-style: "int64", "float32", "float16", "bfloat16", "bool", ...
  std::vector<Dim> shape;
};

struct GraphSpec {
  std::string kind;  // prefill | step | ar_step
  std::string file;  // ONNX file, relative to the artifact directory
  std::vector<TensorSpec> inputs, outputs;
  std::optional<std::string> engine;     // TensorRT engine file, once built
  std::optional<std::int64_t> bytes;     // size of `file` as written
  std::optional<std::string> digest;     // BLAKE2b-128 of `file`
  std::optional<std::string> kv_update;  // this graph's own cache update, where it differs

  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

struct Model {
  std::int64_t vocab_size = 0, num_layers = 0, num_kv_heads = 0, head_dim = 0;
};

struct Manifest {
  Model model;
  int block_size = 0;
  std::vector<int> proposals;
  std::int64_t mask_token_id = 0;
  int max_seq_len = 0;
  int max_batch = 0;
  std::string precision, target, kv_update;
  std::map<std::string, GraphSpec> graphs;  // by kind
  std::vector<std::string> graph_order;     // kinds in the manifest's order (checks follow it)
  std::map<std::string, std::optional<std::int64_t>> dims;
  std::optional<std::string> tokenizer_file;
  std::optional<std::int64_t> eos_token_id, bos_token_id;
  std::optional<std::string> weights_file, weights_blake2b, weights_sample_blake2b;
  std::int64_t weights_bytes = 0;
  Json raw;  // the parsed manifest, for informational fields (versions, tuning, model config)

  /// How graph `kind` writes the cache: its own kv_update, else the manifest's; "" for the prefill.
  std::string kv_update_of(const std::string& kind) const;
  /// A shape with its named dims resolved; nullopt entries are dynamic.
  std::vector<std::optional<std::int64_t>> resolve(const std::vector<Dim>& shape) const;
};

enum class Verify { none, quick, full };

/// Type and bound checks of a parsed manifest; `where` prefixes every message. Throws Error.
Manifest validate(const Json& d, const std::string& where);

/// Read and check `artifact_dir`/manifest.json (manifest.py load_manifest): bounded JSON, format
/// and version (an unknown version says to re-export), every field, confined file names, the files'
/// sizes, and digests (quick: graphs and the weights' sample; full: the whole weights file too).
Manifest load_manifest(const std::string& artifact_dir, Verify verify = Verify::quick);

/// manifest.py check_name: `name` if it is a plain relative file name, else Error.
std::string check_name(const Json& name, const std::string& what);

/// A path as Python's str(Path(p)) shows it ("a//b/./c/" -> "a/b/c").
std::string py_path(const std::string& p);

}  // namespace tidar
