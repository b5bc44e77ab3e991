/* A multi-turn chat on the terminal with libmoe_edge: each line read is the user's turn; the
 * reply streams as it is generated; the session keeps the conversation's KV cache, so each turn
 * feeds only its new tokens.
 *
 *   ./chat MODEL_DIR [SYSTEM_PROMPT]      (end with Ctrl-D)
 *
 * Build against the installed library: make (see Makefile; pkg-config moe_edge). */
#include <stdio.h>
#include <string.h>

#include <moe_edge.h>

static int print_piece(const char *piece, size_t len, void *user) {
  (void)user;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL_DIR [SYSTEM_PROMPT]\n", argv[0]);
    return 2;
  }
  moe_edge_model *model = NULL;
  if (moe_edge_model_load(argv[1], NULL, &model) != MOE_EDGE_OK) {
    fprintf(stderr, "error: %s\n", moe_edge_last_error());
    return 1;
  }
  moe_edge_session *session = NULL;
  if (moe_edge_session_new(model, &session) != MOE_EDGE_OK) {
    fprintf(stderr, "error: %s\n", moe_edge_last_error());
    moe_edge_model_free(model);
    return 1;
  }
  /* the session holds the model: the handle can go now */
  moe_edge_model_free(model);
  const char *system = argc > 2 ? argv[2] : NULL;
  moe_edge_generate_params gp = moe_edge_generate_default_params();
  gp.max_tokens = 256;
  char line[4096];
  int status = 0;
  for (;;) {
    fputs("> ", stdout);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) break;
    line[strcspn(line, "\n")] = 0;
    if (!line[0]) continue;
    moe_edge_generation_stats stats = moe_edge_generation_stats_init();
    if (moe_edge_chat(session, system, line, &gp, print_piece, NULL, &stats) != MOE_EDGE_OK) {
      fprintf(stderr, "\nerror: %s\n", moe_edge_last_error());
      status = 1;
      break;
    }
    system = NULL; /* set once; the conversation keeps it */
    printf("\n[%u new prompt tokens, %u generated, %.1f tok/s]\n", stats.prompt_tokens, stats.generated_tokens,
           stats.decode_tokens_per_second);
  }
  moe_edge_session_free(session);
  return status;
}
