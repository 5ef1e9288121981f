// kvcore/error.h: every check macro throws kvcore::Error of its kind, with the message parts joined
// and the raising file:line appended to what() but not to message().
#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <string>

#include "kvcore/error.h"
#include "test_util.h"

namespace kvcore {
namespace {

std::optional<Error> capture(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  return std::nullopt;
}

// The raise happened at test_error.cpp:`line` with exactly `message`.
void expect_located(const std::optional<Error>& e, ErrorKind kind, const std::string& message, int line) {
  ASSERT_TRUE(e.has_value()) << "nothing was thrown";
  EXPECT_EQ(e->kind(), kind) << test::kind_name(e->kind());
  EXPECT_EQ(e->message(), message);
  EXPECT_EQ(std::string(e->what()), message + " [test_error.cpp:" + std::to_string(line) + "]");
  EXPECT_EQ(e->message().find("test_error.cpp"), std::string::npos);
}

TEST(Error, CheckValueThrowsValueKind) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_CHECK_VALUE(1 + 1 == 3, "k: bad size ", 42, " (want ", 7, ")"); });
  expect_located(e, ErrorKind::Value, "k: bad size 42 (want 7)", line);
}

TEST(Error, CheckTypeThrowsTypeKind) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_CHECK_TYPE(false, "v: dtype ", "int32", " is not supported"); });
  expect_located(e, ErrorKind::Type, "v: dtype int32 is not supported", line);
}

TEST(Error, CheckIndexThrowsIndexKind) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_CHECK_INDEX(false, "slot_mapping[", 3, "] = ", -7LL, " is out of range"); });
  expect_located(e, ErrorKind::Index, "slot_mapping[3] = -7 is out of range", line);
}

TEST(Error, CheckMemoryThrowsMemoryKind) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_CHECK_MEMORY(false, "pool exhausted: ", 0, " of ", 128, " pages free"); });
  expect_located(e, ErrorKind::Memory, "pool exhausted: 0 of 128 pages free", line);
}

TEST(Error, CheckThrowsRuntimeKind) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_CHECK(false, "cudaMalloc failed: ", "out of memory"); });
  expect_located(e, ErrorKind::Runtime, "cudaMalloc failed: out of memory", line);
}

TEST(Error, ThrowMacroThrowsUnconditionally) {
  const int line = __LINE__ + 1;
  auto e = capture([] { KVCORE_THROW(ErrorKind::Index, "page ", 9, " of ", 4); });
  expect_located(e, ErrorKind::Index, "page 9 of 4", line);
}

TEST(Error, PassingCheckEvaluatesConditionOnceAndSkipsMessage) {
  int condition_evaluations = 0, message_evaluations = 0;
  auto condition = [&] { return ++condition_evaluations > 0; };
  auto message = [&] { return ++message_evaluations; };
  KVCORE_CHECK_VALUE(condition(), "never built ", message());
  EXPECT_EQ(condition_evaluations, 1);
  EXPECT_EQ(message_evaluations, 0);  // checks on hot paths must not format anything
}

TEST(Error, MacroIsASingleStatement) {
  // do { } while (0): the macro must bind correctly inside an unbraced if/else.
  bool else_taken = false;
  if (false)
    KVCORE_CHECK(false, "unreachable");
  else
    else_taken = true;
  EXPECT_TRUE(else_taken);
}

TEST(Error, CatchableAsStdRuntimeError) {
  try {
    KVCORE_CHECK_VALUE(false, "as std");
    FAIL() << "did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("as std ["), std::string::npos) << e.what();
  }
}

TEST(Error, LocationUsesTheFileBasename) {
  EXPECT_STREQ(Error(ErrorKind::Value, "m", "/a/b/c/kv_cache.cpp", 12).what(), "m [kv_cache.cpp:12]");
  EXPECT_STREQ(Error(ErrorKind::Value, "m", "plain.cpp", 3).what(), "m [plain.cpp:3]");
  EXPECT_EQ(Error(ErrorKind::Type, "only the message", "/x/y.cpp", 1).message(), "only the message");
}

}  // namespace
}  // namespace kvcore
