#include "tidar/manifest.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "tidar/blake2b.h"
#include "tidar/error.h"
#include "tidar/layout.h"

namespace fs = std::filesystem;

namespace tidar {
namespace {

constexpr std::uint64_t kMaxManifestBytes = 16 << 20;  // a manifest is a few KiB
constexpr int kMaxJsonDepth = 32;
const std::vector<std::string> kPrecisions = {"fp32", "fp16", "bf16", "int8", "fp8", "int4", "int8-wo"};
const std::vector<std::string> kTensorDtypes = {"int64",   "int32",   "int8",     "uint8",        "bool",
                                                "float32", "float16", "bfloat16", "float8e4m3fn", "float8_e4m3fn"};
const std::vector<std::string> kKvUpdates = {"slice", "inplace"};
const std::map<std::string, std::int64_t> kLimits = {
    {"vocab_size", 1 << 24}, {"num_layers", 1024},  {"num_heads", 1024},     {"num_kv_heads", 1024},
    {"head_dim", 1024},      {"hidden_size", 1 << 17}, {"block_size", 1024}, {"max_seq_len", 1 << 22},
    {"max_batch", 4096}};
const std::set<std::string> kManifestFields = {"model",   "block_size", "proposals", "mask_token_id", "max_seq_len",
                                               "max_batch", "precision", "target",  "kv_update",     "graphs",
                                               "dims",    "tokenizer",  "versions", "weights",       "tuning",
                                               "format",  "version"};
const std::set<std::string> kGraphFields = {"kind",        "file",  "inputs", "outputs", "engine",
                                            "engine_info", "bytes", "digest", "kv_update"};
const std::map<std::string, std::vector<std::string>> kRuntimeInputs = {
    {"prefill", {"input_ids"}}, {"step", {"draft_ids", "cache_len"}}, {"ar_step", {"input_ids", "cache_len"}}};
const std::vector<std::string> kRuntimeOutputs = {"token_ids", "logits"};

std::string join(const std::vector<std::string>& xs, const std::string& sep) {
  std::string out;
  for (std::size_t i = 0; i < xs.size(); ++i) out += (i ? sep : "") + xs[i];
  return out;
}

bool contains(const std::vector<std::string>& xs, const std::string& x) {
  return std::find(xs.begin(), xs.end(), x) != xs.end();
}

Json get(const Json& obj, const std::string& key, const Json& fallback = nullptr) {
  auto it = obj.find(key);
  return it == obj.end() ? fallback : *it;
}

/// Type and bound checks with the field's path in the message (manifest.py _Fields).
struct Fields {
  std::string where;

  Error fail(const std::string& field, const std::string& want, const Json& value) const {
    return Error(where + ": malformed manifest (" + field + " must be " + want + ", got " + head(py_repr(value), 60) + ")");
  }

  std::optional<std::int64_t> integer(const std::string& field, const Json& v, std::int64_t lo, std::int64_t hi,
                                      bool none = false) const {
    if (v.is_null() && none) return std::nullopt;
    bool ok = v.is_number_integer() && !(v.is_number_unsigned() && v.get<std::uint64_t>() > INT64_MAX);
    if (ok) {
      auto x = v.get<std::int64_t>();
      ok = lo <= x && x <= hi;
    }
    if (!ok)
      throw fail(field, "an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + (none ? " or null" : ""), v);
    return v.get<std::int64_t>();
  }

  std::optional<std::string> str(const std::string& field, const Json& v, const std::vector<std::string>& choices = {},
                                 bool none = false, std::size_t max_len = 256) const {
    if (v.is_null() && none) return std::nullopt;
    if (!v.is_string() || v.get<std::string>().empty() || chars(v.get<std::string>()) > max_len ||
        (!choices.empty() && !contains(choices, v.get<std::string>())))
      throw fail(field, choices.empty() ? "a non-empty string" : "one of " + join(choices, ", "), v);
    return v.get<std::string>();
  }

  Json obj(const std::string& field, const Json& v) const {
    if (!v.is_object()) throw fail(field, "an object", v);
    return v;
  }

  Json list(const std::string& field, const Json& v, std::size_t max_len = 1 << 16) const {
    if (!v.is_array() || v.size() > max_len)
      throw fail(field, "a list of at most " + std::to_string(max_len) + " entries", v);
    return v;
  }
};

Json sorted_keys(const Json& obj) {
  std::vector<std::string> keys;
  for (auto it = obj.begin(); it != obj.end(); ++it) keys.push_back(it.key());
  std::sort(keys.begin(), keys.end());
  return Json(keys);
}

TensorSpec read_tensor(const Fields& f, const std::string& at, const Json& t, const Json& dims) {
  f.obj(at, t);
  if (t.size() != 3 || !t.contains("name") || !t.contains("dtype") || !t.contains("shape"))
    throw f.fail(at, "an object with name, dtype, shape", sorted_keys(t));
  TensorSpec spec;
  spec.name = *f.str(at + ".name", t["name"]);
  spec.dtype = *f.str(at + ".dtype", t["dtype"], kTensorDtypes);
  for (const auto& dim : f.list(at + ".shape", t["shape"], 8)) {
    if (dim.is_string()) {
      if (!dims.contains(dim.get<std::string>())) throw f.fail(at + ".shape", "ints or names of dims", dim);
      spec.shape.emplace_back(dim.get<std::string>());
    } else {
      spec.shape.emplace_back(*f.integer(at + ".shape", dim, 0, std::int64_t{1} << 31));
    }
  }
  return spec;
}

void check_bindings(const std::string& where, const std::string& kind, const std::string& side,
                    const std::vector<TensorSpec>& specs, const std::vector<std::string>& want, int layers) {
  std::vector<std::string> names;
  for (const auto& t : specs) names.push_back(t.name);
  const std::string kv = side == "inputs" ? kPastPrefix : kPresentPrefix;
  for (const auto& n : want)
    if (!contains(names, n))
      throw Error(where + ": malformed manifest (graphs." + kind + "." + side + " lacks the binding " +
                  py_str(head(n, 60)) + ")");
  for (const auto& n : names)
    if (n.rfind(kv + ".", 0) == 0 && !contains(want, n))
      throw Error(where + ": malformed manifest (graphs." + kind + "." + side + " has " + py_str(head(n, 60)) +
                  ", which a " + std::to_string(layers) + "-layer model does not have)");
}

GraphSpec read_graph(const Fields& f, const std::string& kind, const Json& g, const Json& dims, int layers) {
  const std::string at = "graphs." + kind;
  f.obj(at, g);
  std::vector<std::string> extra;
  for (auto it = g.begin(); it != g.end(); ++it)
    if (!kGraphFields.count(it.key())) extra.push_back(it.key());
  std::sort(extra.begin(), extra.end());
  if (!extra.empty()) throw Error(f.where + ": malformed manifest (unknown field " + at + "." + head(extra[0], 60) + ")");
  GraphSpec spec;
  spec.kind = *f.str(at + ".kind", get(g, "kind"), {kind});
  spec.file = check_name(get(g, "file"), f.where + ": " + at + ".file");
  if (!get(g, "engine").is_null()) spec.engine = check_name(g["engine"], f.where + ": " + at + ".engine");
  f.obj(at + ".engine_info", get(g, "engine_info", Json::object()));
  spec.bytes = f.integer(at + ".bytes", get(g, "bytes"), 0, std::int64_t{1} << 46, true);
  spec.digest = f.str(at + ".digest", get(g, "digest"), {}, true, 128);
  spec.kv_update = f.str(at + ".kv_update", get(g, "kv_update"), kKvUpdates, true);
  if (kind == "prefill" && spec.kv_update)
    throw f.fail(at + ".kv_update", "absent (the prefill graph has no cache input)", g["kv_update"]);
  for (const std::string side : {"inputs", "outputs"}) {
    const auto& list = f.list(at + "." + side, get(g, side), 4 * 1024 + 8);
    auto& specs = side == "inputs" ? spec.inputs : spec.outputs;
    for (std::size_t i = 0; i < list.size(); ++i)
      specs.push_back(read_tensor(f, at + "." + side + "[" + std::to_string(i) + "]", list[i], dims));
  }
  std::vector<std::string> want_in = kRuntimeInputs.at(kind), want_out = kRuntimeOutputs;
  if (kind != "prefill")
    for (const auto& n : past_names(layers)) want_in.push_back(n);
  for (const auto& n : present_names(layers)) want_out.push_back(n);
  check_bindings(f.where, kind, "inputs", spec.inputs, want_in, layers);
  check_bindings(f.where, kind, "outputs", spec.outputs, want_out, layers);
  return spec;
}

/// Nesting depth of JSON text (brackets outside strings), without parsing it.
int json_depth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (n < 0 || i + n >= s.size() + (n == 0 ? 1 : 0)) return false;
    for (int k = 1; k <= n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n + 1;
  }
  return true;
}

/// A JSON file of bounded size and depth (manifest.py read_json).
Json read_json(const std::string& path) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  if (ec) throw Error(path + ": " + ec.message());
  if (size > kMaxManifestBytes)
    throw Error(path + ": " + std::to_string(size) + " bytes, more than the " + std::to_string(kMaxManifestBytes) +
                " this JSON file may have");
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  if (!valid_utf8(s)) throw Error(path + ": invalid JSON (not UTF-8)");
  if (json_depth(s) > kMaxJsonDepth)
    throw Error(path + ": invalid JSON (nested more than " + std::to_string(kMaxJsonDepth) + " levels)");
  try {
    return Json::parse(s);
  } catch (const Json::parse_error& e) {
    std::string what = e.what();
    throw Error(path + ": invalid JSON (" + what.substr(0, what.find('\n')) + ")");
  }
}

/// manifest.py confined(): folder/name, refused if it resolves (symlinks followed) outside folder.
fs::path confined(const std::string& folder, const std::string& name, const std::string& what) {
  check_name(name, what);
  fs::path path = fs::path(folder) / name;
  fs::path bound = fs::weakly_canonical(fs::absolute(folder));
  fs::path real = fs::weakly_canonical(fs::absolute(path));
  auto b = bound.begin(), r = real.begin();
  for (; b != bound.end() && r != real.end() && *b == *r; ++b, ++r) {
  }
  if (b != bound.end())
    throw Error(what + ": " + py_str(name) + " resolves outside " + py_path(folder) + " (a symlink): refused");
  return path;
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

std::int64_t size_of(const fs::path& p) { return static_cast<std::int64_t>(fs::file_size(p)); }

void verify_digests(const std::string& dir, const Manifest& m, bool full) {
  auto mismatch = [&](const std::string& file) {
    return Error(dir + ": " + file + " does not match its digest in the manifest (corrupt or modified after export)");
  };
  for (const auto& kind : m.graph_order) {
    const auto& g = m.graphs.at(kind);
    if (g.digest && file_digest((fs::path(dir) / g.file).string()) != *g.digest) throw mismatch(g.file);
  }
  if (m.weights_file) {
    const std::string w = (fs::path(dir) / *m.weights_file).string();
    if (m.weights_sample_blake2b && sample_digest(w) != *m.weights_sample_blake2b) throw mismatch(*m.weights_file);
    if (full && m.weights_blake2b && file_digest(w) != *m.weights_blake2b) throw mismatch(*m.weights_file);
  }
}

}  // namespace

const TensorSpec* GraphSpec::input(const std::string& name) const {
  for (const auto& t : inputs)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorSpec* GraphSpec::output(const std::string& name) const {
  for (const auto& t : outputs)
    if (t.name == name) return &t;
  return nullptr;
}

std::string Manifest::kv_update_of(const std::string& kind) const {
  if (kind == "prefill") return "";
  const auto& g = graphs.at(kind);
  return g.kv_update ? *g.kv_update : kv_update;
}

std::vector<std::optional<std::int64_t>> Manifest::resolve(const std::vector<Dim>& shape) const {
  std::vector<std::optional<std::int64_t>> out;
  for (const auto& d : shape) {
    if (std::holds_alternative<std::int64_t>(d)) out.emplace_back(std::get<std::int64_t>(d));
    else {
      auto it = dims.find(std::get<std::string>(d));
      out.push_back(it == dims.end() ? std::nullopt : it->second);
    }
  }
  return out;
}

std::string py_path(const std::string& p) {
  if (p.empty()) return ".";
  std::vector<std::string> parts;
  std::stringstream ss(p);
  std::string part;
  while (std::getline(ss, part, '/'))
    if (!part.empty() && part != ".") parts.push_back(part);
  std::string out = p[0] == '/' ? "/" : "";
  out += join(parts, "/");
  return out.empty() ? "." : out;
}

std::string check_name(const Json& name, const std::string& what) {
  if (!name.is_string() || name.get<std::string>().empty())
    throw Error((what + ": expected a file name, got " + py_repr(name)).substr(0, 300));
  const std::string s = name.get<std::string>();
  if (chars(s) > 255 || s.find('\0') != std::string::npos || s.find('\\') != std::string::npos ||
      s.find(':') != std::string::npos)
    throw Error(what + ": " + py_str(head(s, 80)) + " is not a plain file name");
  bool outside = s[0] == '/' || s[0] == '~';
  std::stringstream ss(s);
  std::string part;
  std::size_t n = 0;
  while (std::getline(ss, part, '/')) outside |= part.empty() || part == "..", ++n;
  outside |= s.back() == '/';  // a trailing empty part
  if (outside) throw Error(what + ": " + py_str(head(s, 80)) + " points outside its folder (absolute or '..'): refused");
  return s;
}

Manifest validate(const Json& d, const std::string& where) {
  Fields f{where};
  f.obj("the manifest", d);
  std::vector<std::string> unknown;
  for (auto it = d.begin(); it != d.end(); ++it)
    if (!kManifestFields.count(it.key())) unknown.push_back(it.key());
  std::sort(unknown.begin(), unknown.end());
  if (!unknown.empty()) throw Error(where + ": malformed manifest (unknown field " + py_str(head(unknown[0], 60)) + ")");
  for (const char* key : {"model", "block_size", "proposals", "mask_token_id", "max_seq_len", "max_batch", "precision",
                          "target", "kv_update", "graphs", "dims"})
    if (!d.contains(key)) throw Error(where + ": malformed manifest (missing field " + py_str(key) + ")");

  Manifest m;
  m.raw = d;
  const Json& model = f.obj("model", d["model"]);
  std::int64_t* allocated[] = {&m.model.vocab_size, &m.model.num_layers, &m.model.num_kv_heads, &m.model.head_dim};
  const char* allocated_keys[] = {"vocab_size", "num_layers", "num_kv_heads", "head_dim"};  // a runtime allocates from these
  for (int i = 0; i < 4; ++i)
    *allocated[i] = *f.integer(std::string("model.") + allocated_keys[i], get(model, allocated_keys[i]), 1,
                               kLimits.at(allocated_keys[i]));
  for (const char* key : {"hidden_size", "num_heads"})  // informational; bounded when present
    if (model.contains(key)) f.integer(std::string("model.") + key, model[key], 1, kLimits.at(key));
  if (model.contains("num_heads") && model["num_heads"].get<std::int64_t>() % m.model.num_kv_heads)
    throw f.fail("model.num_kv_heads", "a divisor of num_heads " + std::to_string(model["num_heads"].get<std::int64_t>()),
                 model["num_kv_heads"]);
  const auto vocab = m.model.vocab_size;
  const int layers = static_cast<int>(m.model.num_layers);

  m.block_size = static_cast<int>(*f.integer("block_size", d["block_size"], 1, kLimits.at("block_size")));
  const int b = m.block_size;
  const Json& rs = f.list("proposals", d["proposals"], static_cast<std::size_t>(b));
  bool ok = !rs.empty();
  for (std::size_t i = 0; ok && i < rs.size(); ++i) {
    ok = rs[i].is_number_integer() && rs[i].get<std::int64_t>() >= 1 && rs[i].get<std::int64_t>() <= b &&
         (i == 0 || rs[i].get<std::int64_t>() > rs[i - 1].get<std::int64_t>());
    if (ok) m.proposals.push_back(static_cast<int>(rs[i].get<std::int64_t>()));
  }
  if (!ok || m.proposals[0] != 1)
    throw f.fail("proposals", "ascending distinct integers in 1.." + std::to_string(b) + " starting with 1", rs);
  m.mask_token_id = *f.integer("mask_token_id", d["mask_token_id"], 0, vocab - 1);
  const Json max_pos = get(model, "max_position_embeddings");
  std::int64_t hi = kLimits.at("max_seq_len");
  if (max_pos.is_number_integer() && max_pos.get<std::int64_t>() > 0) hi = std::min(hi, max_pos.get<std::int64_t>());
  m.max_seq_len = static_cast<int>(*f.integer("max_seq_len", d["max_seq_len"], step_len(b, m.proposals) + 1, hi));
  m.max_batch = static_cast<int>(*f.integer("max_batch", d["max_batch"], 1, kLimits.at("max_batch")));
  m.precision = *f.str("precision", d["precision"], kPrecisions);
  m.target = *f.str("target", d["target"], {}, false, 64);
  m.kv_update = *f.str("kv_update", d["kv_update"], kKvUpdates);
  const Json& dims = f.obj("dims", d["dims"]);
  for (auto it = dims.begin(); it != dims.end(); ++it) {
    f.str("dims key", it.key(), {}, false, 64);
    m.dims[it.key()] = f.integer("dims." + it.key(), it.value(), 0, std::int64_t{1} << 31, true);
  }
  const Json& graphs = f.obj("graphs", d["graphs"]);
  std::vector<std::string> kinds = kGraphKinds;
  std::sort(kinds.begin(), kinds.end());
  if (sorted_keys(graphs) != Json(kinds))
    throw f.fail("graphs", "an object with exactly " + join(kGraphKinds, ", "), sorted_keys(graphs));
  for (auto it = graphs.begin(); it != graphs.end(); ++it) {
    m.graphs[it.key()] = read_graph(f, it.key(), it.value(), dims, layers);
    m.graph_order.push_back(it.key());
  }
  // The cache a backend allocates: [max_batch, num_kv_heads, max_seq_len, head_dim] per binding.
  const std::string past0 = past_names(layers)[0];
  auto shape = m.resolve(m.graphs["step"].input(past0)->shape);
  std::vector<std::int64_t> want = {m.max_batch, m.model.num_kv_heads, m.max_seq_len, m.model.head_dim};
  bool shape_ok = shape.size() == 4;
  for (std::size_t i = 0; shape_ok && i < 4; ++i) shape_ok = !shape[i] || *shape[i] == want[i];
  if (!shape_ok) {
    Json shown = Json::array();
    for (const auto& s : shape) shown.push_back(s ? Json(*s) : Json(nullptr));
    throw f.fail("graphs.step.inputs " + past0 + " shape",
                 py_repr(Json(want)) + " (batch, kv heads, max_seq_len, head_dim)", shown);
  }
  const Json tok_v = get(d, "tokenizer", Json::object());
  const Json tok = tok_v.is_null() ? Json::object() : f.obj("tokenizer", tok_v);
  if (!get(tok, "file").is_null()) m.tokenizer_file = check_name(tok["file"], where + ": tokenizer.file");
  m.eos_token_id = f.integer("tokenizer.eos_token_id", get(tok, "eos_token_id"), 0, vocab - 1, true);
  m.bos_token_id = f.integer("tokenizer.bos_token_id", get(tok, "bos_token_id"), 0, vocab - 1, true);
  const Json w_v = get(d, "weights", Json::object());
  const Json weights = w_v.is_null() ? Json::object() : f.obj("weights", w_v);
  if (!weights.empty()) {
    m.weights_file = check_name(get(weights, "file"), where + ": weights.file");
    m.weights_bytes = *f.integer("weights.bytes", get(weights, "bytes"), 0, std::int64_t{1} << 46);
    m.weights_blake2b = f.str("weights.blake2b", get(weights, "blake2b"), {}, true, 128);
    m.weights_sample_blake2b = f.str("weights.sample_blake2b", get(weights, "sample_blake2b"), {}, true, 128);
  }
  for (const char* key : {"versions", "tuning"}) {
    const Json v = get(d, key, Json::object());
    if (!v.is_null()) f.obj(key, v);
  }
  return m;
}

Manifest load_manifest(const std::string& artifact_dir, Verify verify) {
  const std::string dir = py_path(artifact_dir);
  const std::string path = dir == "." ? kManifestFile : dir + "/" + kManifestFile;
  std::error_code ec;
  if (!fs::is_directory(artifact_dir, ec)) throw Error("artifact directory not found: " + dir);
  if (!is_file(path)) throw Error(dir + ": no manifest.json (not an artifact, or an interrupted export)");
  const Json d = read_json(path);
  if (!d.is_object() || get(d, "format") != Json(kManifestFormat)) throw Error(path + ": not a TiDAR manifest");
  const Json version = get(d, "version");
  const bool known = (version.is_number() && version.get<double>() == kManifestVersion) ||
                     (version.is_boolean() && version.get<bool>() && kManifestVersion == 1);  // Python: True == 1
  if (!known)
    throw Error(path + ": manifest version " + head(py_repr(version), 20) +
                " is not supported by this runtime (it reads version " + std::to_string(kManifestVersion) +
                "); re-export the artifact or upgrade tidar-export");
  Manifest m = validate(d, path);
  for (const auto& kind : m.graph_order) {
    const auto& g = m.graphs.at(kind);
    std::vector<std::string> files = {g.file};
    if (g.engine) files.push_back(*g.engine);
    for (const auto& file : files)
      if (!is_file(confined(dir, file, path + ": " + g.kind + " file")))
        throw Error(dir + ": " + g.kind + " file " + file + " named by the manifest is missing");
    if (g.bytes && size_of(fs::path(dir) / g.file) != *g.bytes)
      throw Error(dir + ": " + g.file + " has " + std::to_string(size_of(fs::path(dir) / g.file)) +
                  " bytes, the manifest says " + std::to_string(*g.bytes) + " (truncated or modified after export)");
  }
  if (m.tokenizer_file) confined(dir, *m.tokenizer_file, path + ": tokenizer file");
  if (m.weights_file) {
    auto w = confined(dir, *m.weights_file, path + ": weight file");
    if (!is_file(w)) throw Error(dir + ": weight file " + *m.weights_file + " named by the manifest is missing");
    if (size_of(w) != m.weights_bytes)
      throw Error(dir + ": " + *m.weights_file + " has " + std::to_string(size_of(w)) + " bytes, the manifest says " +
                  std::to_string(m.weights_bytes) + " (truncated or modified after export)");
  }
  if (verify != Verify::none) verify_digests(dir, m, verify == Verify::full);
  return m;
}

}  // namespace tidar
