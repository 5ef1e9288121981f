// kvcore/runtime.h: build facts, the CUDA availability probe, and the debug-checks switch.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include "kvcore/build_config.h"
#include "kvcore/runtime.h"
#include "test_util.h"

namespace kvcore {
namespace {

TEST(BuildInfo, DescribesThisBuild) {
  BuildInfo b = build_info();
  EXPECT_FALSE(b.version.empty());
  EXPECT_EQ(b.version, KVCORE_VERSION);
  EXPECT_EQ(b.cuda_compiled, bool(KVCORE_WITH_CUDA));
  EXPECT_FALSE(b.compiler.empty());
#if !KVCORE_WITH_CUDA
  EXPECT_TRUE(b.cuda_architectures.empty());
  EXPECT_TRUE(b.cuda_version.empty());
#else
  EXPECT_FALSE(b.cuda_architectures.empty());
  EXPECT_FALSE(b.cuda_version.empty());
#endif
}

TEST(CudaStatus, NeverThrowsAndIsStable) {
  CudaStatus first, second;
  ASSERT_NO_THROW(first = cuda_status());
  ASSERT_NO_THROW(second = cuda_status());
  EXPECT_EQ(first.available, second.available);
  EXPECT_EQ(first.reason, second.reason);
  EXPECT_EQ(first.device_count, second.device_count);
  EXPECT_FALSE(first.reason.empty());  // says why not, or what was found
  if (first.available) {
    EXPECT_GT(first.device_count, 0);
    EXPECT_GT(first.runtime_version, 0);
  }
}

#if !KVCORE_WITH_CUDA
TEST(CudaStatus, CpuOnlyBuildIsUnavailableWithAReason) {
  CudaStatus s = cuda_status();
  EXPECT_FALSE(s.available);
  EXPECT_NE(s.reason.find("without CUDA"), std::string::npos) << s.reason;
  EXPECT_EQ(s.device_count, 0);
  EXPECT_EQ(s.driver_version, 0);
  EXPECT_EQ(s.runtime_version, 0);
}
#endif

TEST(RequireCuda, ThrowsRuntimeNamingTheOpWhenUnavailable) {
  CudaStatus s = cuda_status();
  if (s.available) {
    EXPECT_NO_THROW(require_cuda("probe_op"));
  } else {
    EXPECT_TRUE(test::throws_error([] { require_cuda("probe_op"); }, ErrorKind::Runtime,
                                   {"probe_op: CUDA is not available: " + s.reason}));
  }
}

TEST(DebugChecks, FollowTheEnvironmentAndToggle) {
  const bool initial = debug_checks();
  const char* env = std::getenv("KVCORE_DEBUG");
  EXPECT_EQ(initial, env && *env && std::strcmp(env, "0") != 0);
  set_debug_checks(true);
  EXPECT_TRUE(debug_checks());
  set_debug_checks(false);
  EXPECT_FALSE(debug_checks());
  set_debug_checks(true);
  EXPECT_TRUE(debug_checks());
  set_debug_checks(initial);
  EXPECT_EQ(debug_checks(), initial);
}

}  // namespace
}  // namespace kvcore
