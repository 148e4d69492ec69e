#include "tidar/manifest.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "tidar/blake2b.h"
#include "tidar/error.h"

namespace fs = std::filesystem;

namespace tidar {
namespace {

// The contract's tables (runtime/contract.py, manifest.py), in their order.
constexpr std::uint64_t kMaxManifestBytes = 16 << 20;  // a manifest is a few KiB
constexpr int kMaxJsonDepth = 32;
const std::vector<std::string> kPrecisions = {"fp32", "fp16", "bf16", "int8", "fp8", "int4", "int8-wo"};
const std::vector<std::string> kFloatDtypes = {"float32", "float16", "bfloat16"};  // of the KV cache
const std::vector<std::string> kTensorDtypes = {"float32", "float16", "bfloat16", "int64",       "int32",
                                                "int8",    "uint8",   "bool",     "float8e4m3fn"};
const std::vector<std::string> kKvUpdates = {"slice", "inplace"};
const std::vector<std::string> kArSteps = {"gqa", "attention"};
const std::vector<std::string> kExportFields = {"target", "precision", "proposals", "mask_token_id", "ar_step"};
using Bounds = std::pair<std::int64_t, std::int64_t>;
// Bounds of the model config's integers (contract.py BOUNDS), in model.* where present.
const std::map<std::string, Bounds> kBounds = {
    {"vocab_size", {1, 1 << 24}},  {"hidden_size", {1, 1 << 17}},  {"intermediate_size", {1, 1 << 20}},
    {"num_layers", {1, 1024}},     {"num_heads", {1, 1024}},       {"num_kv_heads", {1, 1024}},
    {"head_dim", {2, 1024}},       {"max_position_embeddings", {1, 1 << 24}}, {"block_size", {1, 1024}},
    {"max_seq_len", {2, 1 << 22}}, {"max_batch", {1, 4096}}};
// Every named dim (contract.py DIMS, in order); the dynamic ones are null, the others bounded.
const std::vector<std::string> kDims = {"batch",      "prefill_batch", "prompt_len", "prefill_len",
                                        "block_size", "q_len",         "n_out",      "max_seq_len",
                                        "kv_heads",   "head_dim",      "vocab",      "num_layers"};
const std::set<std::string> kDynamicDims = {"prefill_batch", "prompt_len", "prefill_len"};
const std::map<std::string, Bounds> kDimBounds = {
    {"batch", {1, 4096}},        {"block_size", {1, 1024}}, {"q_len", {2, 1 << 22}},   {"n_out", {1, 1 << 22}},
    {"max_seq_len", {2, 1 << 22}}, {"kv_heads", {1, 1024}}, {"head_dim", {2, 1024}},   {"vocab", {1, 1 << 24}},
    {"num_layers", {1, 1024}}};
const std::set<std::string> kManifestFields = {"model",   "export",  "dims",    "graphs", "tokenizer", "versions",
                                               "weights", "tuning",  "adapter", "format", "version"};
const std::set<std::string> kGraphFields = {"kind",   "file",   "kv_update", "rows",  "inputs",
                                            "outputs", "engine", "engine_info", "bytes", "digest"};

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

  std::optional<std::int64_t> integer(const std::string& field, const Json& v, Bounds bounds, bool none = false) const {
    return integer(field, v, bounds.first, bounds.second, none);
  }

  std::optional<std::string> str(const std::string& field, const Json& v, const std::vector<std::string>& choices = {},
                                 bool none = false, std::size_t max_len = 256) const {
    if (v.is_null() && none) return std::nullopt;
    if (!v.is_string() || v.get<std::string>().empty() || chars(v.get<std::string>()) > max_len ||
        (!choices.empty() && !contains(choices, v.get<std::string>())))
      throw fail(field, choices.empty() ? "a non-empty string" : "one of " + join(choices, ", "), v);
    return v.get<std::string>();
  }

  Json obj(const std::string& field, const Json& v, bool none = false) const {
    if (v.is_null() && none) return Json::object();
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

/// Whether Python's == holds between the values json.loads makes of `a` and `b` (numbers and
/// booleans compare by value, objects regardless of key order).
bool py_equal(const Json& a, const Json& b) {
  auto numeric = [](const Json& v) { return v.is_number() || v.is_boolean(); };
  auto integral = [](const Json& v) { return v.is_number_integer() || v.is_boolean(); };
  auto as_int = [](const Json& v) { return v.is_boolean() ? static_cast<std::int64_t>(v.get<bool>()) : v.get<std::int64_t>(); };
  auto as_double = [](const Json& v) { return v.is_boolean() ? static_cast<double>(v.get<bool>()) : v.get<double>(); };
  if (numeric(a) && numeric(b))
    return integral(a) && integral(b) && !a.is_number_unsigned() && !b.is_number_unsigned() ? as_int(a) == as_int(b)
                                                                                            : as_double(a) == as_double(b);
  if (a.type() != b.type()) return false;
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (!py_equal(a[i], b[i])) return false;
    return true;
  }
  if (a.is_object()) {
    if (a.size() != b.size()) return false;
    for (auto it = a.begin(); it != a.end(); ++it)
      if (!b.contains(it.key()) || !py_equal(it.value(), b[it.key()])) return false;
    return true;
  }
  return a == b;
}

Json shape_json(const std::vector<Dim>& shape) {
  Json out = Json::array();
  for (const auto& d : shape)
    out.push_back(std::holds_alternative<std::int64_t>(d) ? Json(std::get<std::int64_t>(d)) : Json(std::get<std::string>(d)));
  return out;
}

Json rows_json(const std::vector<Row>& rows) {
  Json out = Json::array();
  for (const auto& r : rows) {
    Json row = Json::object();
    if (r.ar >= 0) row["ar"] = r.ar;
    else row["block"] = r.block, row["slot"] = r.slot;
    out.push_back(row);
  }
  return out;
}

/// The rows as Python's json.dumps writes them ([{"ar": 0}, {"block": 1, "slot": 1}]).
std::string rows_text(const std::vector<Row>& rows) {
  std::string out = "[";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out += (i ? ", " : "") + (r.ar >= 0 ? "{\"ar\": " + std::to_string(r.ar) + "}"
                                        : "{\"block\": " + std::to_string(r.block) + ", \"slot\": " +
                                              std::to_string(r.slot) + "}");
  }
  return out + "]";
}

/// The structure of one binding entry: an object of exactly name, dtype (one of the dtypes) and shape.
void check_tensor(const Fields& f, const std::string& at, const Json& t) {
  f.obj(at, t);
  if (t.size() != 3 || !t.contains("name") || !t.contains("dtype") || !t.contains("shape"))
    throw f.fail(at, "an object with name, dtype, shape", sorted_keys(t));
  f.str(at + ".name", t["name"]);
  f.str(at + ".dtype", t["dtype"], kTensorDtypes);
  f.list(at + ".shape", t["shape"], 8);
}

/// One side of a graph's bindings against the contract's: every binding present, no stray cache
/// binding, as many as the contract has, each with the contract's name, dtype and shape.
void check_bindings(const Fields& f, const std::string& at, const std::string& side, const Json& specs,
                    const std::vector<TensorSpec>& want, int layers) {
  std::vector<std::string> names, want_names;
  for (const auto& t : specs) names.push_back(t["name"].get<std::string>());
  for (const auto& w : want) want_names.push_back(w.name);
  const std::string kv = std::string(side == "inputs" ? kPastPrefix : kPresentPrefix) + ".";
  for (const auto& n : want_names)
    if (!contains(names, n))
      throw Error(f.where + ": malformed manifest (" + at + "." + side + " lacks the binding " + py_str(head(n, 60)) + ")");
  for (const auto& n : names)
    if (n.rfind(kv, 0) == 0 && !contains(want_names, n))
      throw Error(f.where + ": malformed manifest (" + at + "." + side + " has " + py_str(head(n, 60)) + ", which a " +
                  std::to_string(layers) + "-layer model does not have)");
  if (names.size() != want.size())
    throw f.fail(at + "." + side, "the " + std::to_string(want.size()) + " bindings of the contract", Json(names));
  for (std::size_t i = 0; i < want.size(); ++i) {
    const Json& t = specs[i];
    const Json w_shape = shape_json(want[i].shape);
    if (names[i] != want[i].name || t["dtype"] != Json(want[i].dtype) || !py_equal(t["shape"], w_shape))
      throw f.fail(at + "." + side + "[" + std::to_string(i) + "] (" + head(names[i], 60) + ") shape and dtype",
                   want[i].dtype + " " + py_repr(w_shape), Json::array({t["dtype"], t["shape"]}));
  }
}

/// One graph (manifest.py _graph): its fields, its rows and its bindings against the contract's
/// for its kv_update. `kv_dtype` is the cache's dtype: "" until the first graph sets it.
GraphSpec read_graph(const Fields& f, const std::string& kind, const Json& g, int block_size,
                     const std::vector<int>& proposals, int layers, std::string& kv_dtype) {
  const std::string at = "graphs." + kind;
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
  if (kind == "prefill") {
    if (!get(g, "kv_update").is_null())
      throw f.fail(at + ".kv_update", "null (the prefill graph has no cache input)", g["kv_update"]);
  } else {
    spec.kv_update = f.str(at + ".kv_update", get(g, "kv_update"), kKvUpdates);
  }
  spec.rows = graph_rows(kind, block_size, proposals);
  if (!py_equal(get(g, "rows"), rows_json(spec.rows)))
    throw f.fail(at + ".rows", "the contract's rows " + head(rows_text(spec.rows), 80), get(g, "rows"));
  Json specs[2];
  const char* sides[2] = {"inputs", "outputs"};
  for (int s = 0; s < 2; ++s) {
    specs[s] = f.list(at + "." + sides[s], get(g, sides[s]), 4 * 1024 + 8);
    for (std::size_t i = 0; i < specs[s].size(); ++i)
      check_tensor(f, at + "." + sides[s] + "[" + std::to_string(i) + "]", specs[s][i]);
  }
  if (kv_dtype.empty()) {  // the float dtype of the cache, from the first cache binding
    kv_dtype = "float32";
    for (const auto& t : specs[1])
      if (t["name"].get<std::string>().rfind(std::string(kPresentPrefix) + ".", 0) == 0) {
        kv_dtype = t["dtype"].get<std::string>();
        break;
      }
    if (!contains(kFloatDtypes, kv_dtype))
      throw f.fail(at + ".outputs " + kPresentPrefix + ".0.key dtype", "one of " + join(kFloatDtypes, ", "), kv_dtype);
  }
  auto [inputs, outputs] = graph_io(kind, layers, kv_dtype, spec.kv_update.value_or(""));
  check_bindings(f, at, "inputs", specs[0], inputs, layers);
  check_bindings(f, at, "outputs", specs[1], outputs, layers);
  spec.inputs = std::move(inputs);  // equal to the manifest's (checked above)
  spec.outputs = std::move(outputs);
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

/// manifest.py verify_digests: graphs, tokenizer and chat template against their digests; the
/// weights against their sampled digest (and the whole-file one with `full`).
void verify_digests(const std::string& dir, const Manifest& m, bool full) {
  auto mismatch = [&](const std::string& file, const char* why) {
    return Error(dir + ": " + file + " does not match its digest in the manifest (" + why + " after export)");
  };
  for (const auto& kind : m.graph_order) {
    const auto& g = m.graphs.at(kind);
    if (g.digest && file_digest((fs::path(dir) / g.file).string()) != *g.digest)
      throw mismatch(g.file, "corrupt or modified");
  }
  const std::pair<const std::optional<std::string>*, const std::optional<std::string>*> tokenizer_files[] = {
      {&m.tokenizer_file, &m.tokenizer_blake2b}, {&m.chat_template, &m.chat_template_blake2b}};
  for (const auto& [file, digest] : tokenizer_files)
    if (*file && *digest && file_digest((fs::path(dir) / **file).string()) != **digest)
      throw mismatch(**file, "replaced or modified");
  if (m.weights_file) {
    const std::string w = (fs::path(dir) / *m.weights_file).string();
    if (m.weights_sample_blake2b && sample_digest(w) != *m.weights_sample_blake2b)
      throw mismatch(*m.weights_file, "corrupt or modified");
    if (full && m.weights_blake2b && file_digest(w) != *m.weights_blake2b)
      throw mismatch(*m.weights_file, "corrupt or modified");
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
  return graphs.at(kind).kv_update.value_or("");
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


namespace {

/// manifest.py _dims: every named dim, static ones in bounds, dynamic ones null; max_seq_len within
/// the model's positions, kv_heads a divisor of its heads.
void read_dims(const Fields& f, const Json& dims, const Json& model, Manifest& m) {
  std::vector<std::string> extra;
  for (auto it = dims.begin(); it != dims.end(); ++it)
    if (!contains(kDims, it.key())) extra.push_back(it.key());
  std::sort(extra.begin(), extra.end());
  if (!extra.empty()) throw Error(f.where + ": malformed manifest (unknown field dims." + head(extra[0], 60) + ")");
  for (const auto& name : kDims) {
    if (!dims.contains(name)) throw Error(f.where + ": malformed manifest (missing field " + py_str("dims." + name) + ")");
    if (kDynamicDims.count(name)) {
      if (!dims[name].is_null()) throw f.fail("dims." + name, "null (a dynamic dim)", dims[name]);
      m.dims[name] = std::nullopt;
    } else {
      m.dims[name] = f.integer("dims." + name, dims[name], kDimBounds.at(name));
    }
  }
  auto dim = [&](const char* name) { return *m.dims.at(name); };
  m.block_size = static_cast<int>(dim("block_size"));
  m.max_seq_len = static_cast<int>(dim("max_seq_len"));
  m.max_batch = static_cast<int>(dim("batch"));
  m.step_len = static_cast<int>(dim("q_len"));
  m.n_out = static_cast<int>(dim("n_out"));
  m.vocab_size = dim("vocab");
  m.num_layers = dim("num_layers");
  m.num_kv_heads = dim("kv_heads");
  m.head_dim = dim("head_dim");
  const Json max_pos = get(model, "max_position_embeddings");
  if (max_pos.is_number_integer() && m.max_seq_len > max_pos.get<std::int64_t>())
    throw f.fail("dims.max_seq_len", "at most the model's max_position_embeddings " + py_repr(max_pos), m.max_seq_len);
  const Json heads = get(model, "num_heads");
  if (heads.is_number_integer() && heads.get<std::int64_t>() % m.num_kv_heads)
    throw f.fail("dims.kv_heads", "a divisor of num_heads " + py_repr(heads), m.num_kv_heads);
}

/// The export section: target, precision, AR step, mask token and proposal levels; q_len and n_out
/// of dims must be those of block_size and the proposals, max_seq_len must hold one step more.
void read_export(const Fields& f, const Json& e, Manifest& m) {
  for (const auto& key : kExportFields)
    if (!e.contains(key)) throw Error(f.where + ": malformed manifest (missing field " + py_str("export." + key) + ")");
  m.target = *f.str("export.target", e["target"], {}, false, 64);
  m.precision = *f.str("export.precision", e["precision"], kPrecisions);
  m.ar_step = *f.str("export.ar_step", e["ar_step"], kArSteps);
  m.mask_token_id = *f.integer("export.mask_token_id", e["mask_token_id"], 0, m.vocab_size - 1);
  const int b = m.block_size;
  const Json& rs = f.list("export.proposals", e["proposals"], static_cast<std::size_t>(b));
  bool ok = !rs.empty();
  for (std::size_t i = 0; ok && i < rs.size(); ++i) {
    ok = rs[i].is_number_integer() && rs[i].get<std::int64_t>() >= 1 && rs[i].get<std::int64_t>() <= b &&
         (i == 0 || rs[i].get<std::int64_t>() > rs[i - 1].get<std::int64_t>());
    if (ok) m.proposals.push_back(static_cast<int>(rs[i].get<std::int64_t>()));
  }
  if (!ok || m.proposals[0] != 1)
    throw f.fail("export.proposals", "ascending distinct integers in 1.." + std::to_string(b) + " starting with 1", rs);
  const std::pair<const char*, int> derived[] = {{"q_len", step_len(b, m.proposals)}, {"n_out", n_out(b, m.proposals)}};
  for (const auto& [name, want] : derived)
    if (*m.dims.at(name) != want)
      throw f.fail(std::string("dims.") + name,
                   std::to_string(want) + " (block_size " + std::to_string(b) + ", proposals " + py_repr(rs) + ")",
                   *m.dims.at(name));
  if (m.max_seq_len < m.step_len + 1)
    throw f.fail("dims.max_seq_len", "at least q_len + 1 = " + std::to_string(m.step_len + 1), m.max_seq_len);
}

/// The tokenizer section: file, chat template, bos, eos (an id or a list of ids), vocab, digests.
void read_tokenizer(const Fields& f, const Json& tok, Manifest& m) {
  const auto vocab = m.vocab_size;
  if (!get(tok, "file").is_null()) m.tokenizer_file = check_name(tok["file"], f.where + ": tokenizer.file");
  m.bos_token_id = f.integer("tokenizer.bos_token_id", get(tok, "bos_token_id"), 0, vocab - 1, true);
  const Json eos = get(tok, "eos_token_id");  // every id stops a sequence
  if (eos.is_array()) {
    f.list("tokenizer.eos_token_id", eos, 64);
    for (std::size_t i = 0; i < eos.size(); ++i)
      m.eos_ids.push_back(*f.integer("tokenizer.eos_token_id[" + std::to_string(i) + "]", eos[i], 0, vocab - 1));
  } else if (auto id = f.integer("tokenizer.eos_token_id", eos, 0, vocab - 1, true)) {
    m.eos_ids.push_back(*id);
  }
  if (!get(tok, "chat_template").is_null())
    m.chat_template = check_name(tok["chat_template"], f.where + ": tokenizer.chat_template");
  f.integer("tokenizer.vocab_size", get(tok, "vocab_size"), 1, vocab, true);
  m.tokenizer_blake2b = f.str("tokenizer.blake2b", get(tok, "blake2b"), {}, true, 128);
  m.chat_template_blake2b = f.str("tokenizer.chat_template_blake2b", get(tok, "chat_template_blake2b"), {}, true, 128);
}

}  // namespace

Manifest validate(const Json& d, const std::string& where) {
  Fields f{where};
  f.obj("the manifest", d);
  std::vector<std::string> unknown;
  for (auto it = d.begin(); it != d.end(); ++it)
    if (!kManifestFields.count(it.key())) unknown.push_back(it.key());
  std::sort(unknown.begin(), unknown.end());
  if (!unknown.empty()) throw Error(where + ": malformed manifest (unknown field " + py_str(head(unknown[0], 60)) + ")");
  for (const char* key : {"model", "export", "dims", "graphs"})
    if (!d.contains(key)) throw Error(where + ": malformed manifest (missing field " + py_str(key) + ")");

  Manifest m;
  m.raw = d;
  m.model = f.obj("model", d["model"]);
  for (auto it = m.model.begin(); it != m.model.end(); ++it)  // informational for a runtime; bounded when present
    if (kBounds.count(it.key())) f.integer("model." + it.key(), it.value(), kBounds.at(it.key()));
  read_dims(f, f.obj("dims", d["dims"]), m.model, m);
  read_export(f, f.obj("export", d["export"]), m);
  const Json& graphs = f.obj("graphs", d["graphs"]);
  std::vector<std::string> kinds = kGraphKinds;
  std::sort(kinds.begin(), kinds.end());
  if (sorted_keys(graphs) != Json(kinds))
    throw f.fail("graphs", "an object with exactly " + join(kGraphKinds, ", "), sorted_keys(graphs));
  std::string kv_dtype;
  for (const auto& kind : kGraphKinds)
    m.graphs[kind] = read_graph(f, kind, f.obj("graphs." + kind, graphs[kind]), m.block_size, m.proposals,
                                static_cast<int>(m.num_layers), kv_dtype);
  for (auto it = graphs.begin(); it != graphs.end(); ++it) m.graph_order.push_back(it.key());
  read_tokenizer(f, f.obj("tokenizer", get(d, "tokenizer", Json::object()), true), m);
  const Json weights = f.obj("weights", get(d, "weights", Json::object()), true);
  if (!weights.empty()) {
    m.weights_file = check_name(get(weights, "file"), where + ": weights.file");
    m.weights_bytes = *f.integer("weights.bytes", get(weights, "bytes"), 0, std::int64_t{1} << 46);
    m.weights_blake2b = f.str("weights.blake2b", get(weights, "blake2b"), {}, true, 128);
    m.weights_sample_blake2b = f.str("weights.sample_blake2b", get(weights, "sample_blake2b"), {}, true, 128);
  }
  for (const char* key : {"versions", "tuning", "adapter"}) f.obj(key, get(d, key, Json::object()), true);
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
  const Json version = get(d, "version");  // Python's !=: 2.0 is 2
  if (!(version.is_number() && version.get<double>() == kManifestVersion))
    throw Error(path + ": manifest version " + head(py_repr(version), 20) +
                " is not supported by this runtime (it reads version " + std::to_string(kManifestVersion) +
                "): re-export the artifact with this version of tidar-export");
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
  if (m.chat_template) confined(dir, *m.chat_template, path + ": tokenizer chat_template");
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
