// The one exception type for user errors (runtime/errors.py's TiDARError): a one-line message.
#pragma once

#include <stdexcept>
#include <string>

namespace tidar {

/// A user-facing error whose message is a single line; tools print "error: <message>" and exit 1.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace tidar
