// Values shown in error messages the way the Python runtime shows them (repr), so the C++ and
// Python tools print the same one-line errors.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tidar {

using Json = nlohmann::ordered_json;  // keeps a manifest's key order, as Python's dict does

/// repr() of a Python float: shortest round-trip digits, "1.0", "1e+16", "inf", "nan".
std::string py_float(double x);
/// repr() of a Python str: single quotes unless the text holds ' and no ".
std::string py_str(const std::string& s);
/// repr() of the Python value json.loads makes of `v` (None, True, 1, 'a', [1, 2], {'a': 1}).
std::string py_repr(const Json& v);
/// The first `n` characters (code points) of UTF-8 text, as Python's s[:n].
std::string head(const std::string& s, std::size_t n);
/// Characters (code points) in UTF-8 text, as Python's len(s).
std::size_t chars(const std::string& s);

}  // namespace tidar
