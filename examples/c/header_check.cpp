// The header used from C++: it compiles with -Wall -Werror, its declarations have C linkage, and
// the library links and answers (run by tests/c/run.sh and the Makefile's `check`).
#include <moe_edge.h>

#include <cstdio>
#include <cstring>
#include <string>

int main() {
  moe_edge_model_params params = moe_edge_model_default_params();
  moe_edge_model *model = nullptr;
  // a missing model: an error code and a message, no exception, no abort
  moe_edge_status status = moe_edge_model_load("/nonexistent", &params, &model);
  std::string error = moe_edge_last_error();
  if (status != MOE_EDGE_ERR_MODEL || model != nullptr || error.find("/nonexistent") == std::string::npos) {
    std::fprintf(stderr, "unexpected: status %d, error '%s'\n", static_cast<int>(status), error.c_str());
    return 1;
  }
  std::printf("moe-edge %s from C++ (int8 kernels: %s)\n", moe_edge_version(), moe_edge_isa());
  return 0;
}
