/* Streams a greedy continuation of a prompt with libmoe_edge.
 *
 *   ./generate MODEL_DIR "prompt text" [MAX_TOKENS]
 *
 * Build against the installed library: make (see Makefile; pkg-config moe_edge). */
#include <stdio.h>
#include <stdlib.h>

#include <moe_edge.h>

static int print_piece(const char *piece, size_t len, void *user) {
  (void)user;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  return 0; /* non-zero would stop the generation */
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL_DIR PROMPT [MAX_TOKENS]\n", argv[0]);
    return 2;
  }
  moe_edge_model *model = NULL;
  moe_edge_model_params mp = moe_edge_model_default_params();
  if (moe_edge_model_load(argv[1], &mp, &model) != MOE_EDGE_OK) {
    fprintf(stderr, "error: %s\n", moe_edge_last_error());
    return 1;
  }
  moe_edge_session *session = NULL;
  if (moe_edge_session_new(model, &session) != MOE_EDGE_OK) {
    fprintf(stderr, "error: %s\n", moe_edge_last_error());
    moe_edge_model_free(model);
    return 1;
  }
  moe_edge_generate_params gp = moe_edge_generate_default_params();
  if (argc > 3) gp.max_tokens = (uint32_t)strtoul(argv[3], NULL, 10);
  moe_edge_generation_stats stats = moe_edge_generation_stats_init();
  fputs(argv[2], stdout);
  moe_edge_status status = moe_edge_generate(session, argv[2], &gp, print_piece, NULL, &stats);
  putchar('\n');
  fflush(stdout);
  if (status == MOE_EDGE_OK) {
    fprintf(stderr, "%u tokens, %.1f tok/s (int8 kernels: %s)\n", stats.generated_tokens,
            stats.decode_tokens_per_second, moe_edge_isa());
  } else {
    fprintf(stderr, "error: %s\n", moe_edge_last_error());
  }
  moe_edge_session_free(session);
  moe_edge_model_free(model);
  return status == MOE_EDGE_OK ? 0 : 1;
}
