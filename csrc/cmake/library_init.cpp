// Registers the ops when libattngate_ops.so (the CMake build) is loaded. A library cannot fail its own loading, so
// when the attngate namespace is already registered in this process (attngate_ext was imported first) the ops
// already there stay in use, from the same sources, and a warning on stderr says so.
#include <cstdio>
#include <string>

#include "registration.h"

namespace {

const bool registered = [] {
  const std::string error = attngate::register_ops("libattngate_ops.so");
  if (!error.empty()) {
    std::fprintf(stderr, "[attngate] warning: %s\n[attngate] the operators registered first stay in use.\n",
                 error.c_str());
  }
  return error.empty();
}();

}  // namespace
