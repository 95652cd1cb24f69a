// SPECFAST_CHECK: cheap re-validation inside the kernels. Throws (never exits, never asserts) so the
// binding layer can turn it into a Python ValueError that names what went wrong.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace specfast {

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace specfast

#define SPECFAST_CHECK(cond, ...)                                                          \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      throw std::invalid_argument(::specfast::str_cat(__VA_ARGS__, " [", __FILE__, ":", \
                                                      __LINE__, "]"));                     \
    }                                                                                      \
  } while (0)
