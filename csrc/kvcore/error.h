// Error model: every failure is a kvcore::Error carrying a kind (which Python exception it
// becomes), the message, and the file:line that raised it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvcore {

enum class ErrorKind {
  Value,    // ValueError: a bad value or shape
  Type,     // TypeError: a bad dtype or kind of argument
  Index,    // IndexError: a page, slot or position out of range
  Memory,   // MemoryError: a pool or allocation exhausted (state left intact)
  Runtime,  // kvcore.KVCoreError: CUDA / driver / system failures, misuse of freed objects
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message, const char* file, int line)
      : std::runtime_error(message + " [" + basename(file) + ":" + std::to_string(line) + "]"),
        kind_(kind),
        message_(message) {}
  ErrorKind kind() const noexcept { return kind_; }
  // The message without the source location.
  const std::string& message() const noexcept { return message_; }

 private:
  static std::string basename(const char* path) {
    std::string s(path);
    auto pos = s.rfind('/');
    return pos == std::string::npos ? s : s.substr(pos + 1);
  }
  ErrorKind kind_;
  std::string message_;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace kvcore

#define KVCORE_THROW(kind, ...) \
  throw ::kvcore::Error((kind), ::kvcore::detail::concat(__VA_ARGS__), __FILE__, __LINE__)

// KVCORE_CHECK_<KIND>(cond, message parts...): throw unless cond holds.
#define KVCORE_CHECK_KIND(kind, cond, ...) \
  do {                                     \
    if (!(cond)) KVCORE_THROW(kind, __VA_ARGS__); \
  } while (0)
#define KVCORE_CHECK_VALUE(cond, ...) KVCORE_CHECK_KIND(::kvcore::ErrorKind::Value, cond, __VA_ARGS__)
#define KVCORE_CHECK_TYPE(cond, ...) KVCORE_CHECK_KIND(::kvcore::ErrorKind::Type, cond, __VA_ARGS__)
#define KVCORE_CHECK_INDEX(cond, ...) KVCORE_CHECK_KIND(::kvcore::ErrorKind::Index, cond, __VA_ARGS__)
#define KVCORE_CHECK_MEMORY(cond, ...) KVCORE_CHECK_KIND(::kvcore::ErrorKind::Memory, cond, __VA_ARGS__)
#define KVCORE_CHECK(cond, ...) KVCORE_CHECK_KIND(::kvcore::ErrorKind::Runtime, cond, __VA_ARGS__)
