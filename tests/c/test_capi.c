/* The C API driven from C: tiny model and its int8 pack generate the tokens the Rust API
 * generates (the expected texts come from `moe-edge generate --json`), streamed pieces join to the
 * full text, a callback and moe_edge_cancel (from another thread) stop a generation, a
 * conversation's second turn feeds only the new tokens, and every error path returns its code
 * with a message.
 *
 *   test_capi TINY_DIR PACK_DIR CHAT_DIR DAMAGED_PACK_DIR EXPECTED_TINY.txt EXPECTED_PACK.txt
 *
 * Run by tests/c/run.sh (plain, under ASan+UBSan, under valgrind, under qemu-aarch64). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_edge.h"

static int failures = 0, checks = 0;
#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    checks++;                                                                \
    if (!(cond)) {                                                           \
      failures++;                                                            \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
      fprintf(stderr, __VA_ARGS__);                                          \
      fprintf(stderr, " (last error: %s)\n", moe_edge_last_error());         \
    }                                                                        \
  } while (0)
/* a failing call: the expected status and a message */
#define EXPECT_ERR(call, status)                                                        \
  do {                                                                                  \
    moe_edge_status s_ = (call);                                                        \
    CHECK(s_ == (status) && strlen(moe_edge_last_error()) > 0, "%s gave %d", #call, s_); \
  } while (0)

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) { perror(path); exit(2); }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  size_t got = fread(s, 1, (size_t)n, f);
  s[got] = 0;
  fclose(f);
  while (got > 0 && (s[got - 1] == '\n')) s[--got] = 0;
  return s;
}

/* collects streamed pieces; stops after `stop_after` pieces if > 0 */
typedef struct {
  char text[65536];
  size_t len;
  int pieces;
  int stop_after;
  moe_edge_session *session; /* for the re-entrant (busy) check */
  moe_edge_status reentrant;
} collector;

static int collect(const char *piece, size_t len, void *user) {
  collector *c = user;
  if (c->len + len < sizeof c->text) {
    memcpy(c->text + c->len, piece, len);
    c->len += len;
    c->text[c->len] = 0;
  }
  c->pieces++;
  if (c->session && c->pieces == 1) {
    /* the session is generating on this very thread: a second use is refused */
    c->reentrant = moe_edge_generate(c->session, "t1", NULL, NULL, NULL, NULL);
  }
  return c->stop_after > 0 && c->pieces >= c->stop_after;
}

/* cancellation from another thread: the callback waits until the canceller has called */
typedef struct {
  moe_edge_session *session;
  atomic_int started, cancelled;
  int pieces;
} cancel_state;

static int wait_for_cancel(const char *piece, size_t len, void *user) {
  (void)piece;
  (void)len;
  cancel_state *c = user;
  c->pieces++;
  atomic_store(&c->started, 1);
  while (!atomic_load(&c->cancelled)) {
  }
  return 0;
}

static void *canceller(void *arg) {
  cancel_state *c = arg;
  while (!atomic_load(&c->started)) {
  }
  moe_edge_cancel(c->session);
  atomic_store(&c->cancelled, 1);
  return NULL;
}

/* one model, two threads, each with its own session: both give the reference text */
typedef struct {
  moe_edge_model *model;
  const char *expected;
  int ok;
} worker_state;

static void *worker(void *arg) {
  worker_state *w = arg;
  moe_edge_session *session = NULL;
  if (moe_edge_session_new(w->model, &session) != MOE_EDGE_OK) return NULL;
  moe_edge_generate_params gp = moe_edge_generate_default_params();
  gp.max_tokens = 16;
  collector *c = calloc(1, sizeof *c);
  w->ok = moe_edge_generate(session, "t10 t20 t30", &gp, collect, c, NULL) == MOE_EDGE_OK &&
          strcmp(c->text, w->expected) == 0;
  free(c);
  moe_edge_session_free(session);
  return NULL;
}

static void generate_like_rust(const char *dir, const char *expected, const char *what) {
  moe_edge_model *model = NULL;
  moe_edge_model_params mp = moe_edge_model_default_params();
  mp.expert_cache_mb = 0; /* the smallest cache: experts are evicted and read again */
  CHECK(moe_edge_model_load(dir, &mp, &model) == MOE_EDGE_OK && model, "loading %s", what);
  if (!model) return;
  moe_edge_session *session = NULL;
  CHECK(moe_edge_session_new(model, &session) == MOE_EDGE_OK, "session");
  moe_edge_generate_params gp = moe_edge_generate_default_params();
  gp.max_tokens = 16;
  collector c = {0};
  moe_edge_generation_stats st = moe_edge_generation_stats_init();
  CHECK(st.struct_size == sizeof st, "stats_init sets struct_size");
  CHECK(moe_edge_generate(session, "t10 t20 t30", &gp, collect, &c, &st) == MOE_EDGE_OK, "generate");
  CHECK(strcmp(c.text, expected) == 0, "%s: streamed '%s', the Rust API gave '%s'", what, c.text, expected);
  CHECK(st.generated_tokens == 16 && st.prompt_tokens == 3, "%s: stats %u %u", what, st.generated_tokens,
        st.prompt_tokens);
  CHECK(st.stop_reason == MOE_EDGE_STOP_MAX_TOKENS, "%s: stop reason %d", what, st.stop_reason);
  moe_edge_cache_stats cs = moe_edge_cache_stats_init();
  CHECK(moe_edge_model_cache_stats(model, &cs) == MOE_EDGE_OK, "cache stats");
  if (cs.packed) {
    CHECK(cs.misses > 0 && cs.peak_resident_bytes <= cs.budget_bytes, "%s: cache %llu misses, peak %llu of %llu",
          what, (unsigned long long)cs.misses, (unsigned long long)cs.peak_resident_bytes,
          (unsigned long long)cs.budget_bytes);
  }
  /* the same model from two threads at once */
  pthread_t threads[2];
  worker_state ws[2] = {{model, expected, 0}, {model, expected, 0}};
  for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, worker, &ws[i]);
  for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
  CHECK(ws[0].ok && ws[1].ok, "%s: two threads on one model: %d %d", what, ws[0].ok, ws[1].ok);
  /* the model may go first: the session keeps it */
  moe_edge_model_free(model);
  collector more = {0};
  gp.max_tokens = 4;
  CHECK(moe_edge_generate(session, " t40", &gp, collect, &more, &st) == MOE_EDGE_OK, "continuing after the model's free");
  CHECK(st.generated_tokens == 4, "continued %u", st.generated_tokens);
  moe_edge_session_free(session);
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s TINY PACK CHAT DAMAGED EXPECTED_TINY EXPECTED_PACK\n", argv[0]);
    return 2;
  }
  const char *tiny = argv[1], *pack = argv[2], *chat_dir = argv[3], *damaged = argv[4];
  char *expected_tiny = read_file(argv[5]), *expected_pack = read_file(argv[6]);

  CHECK(strlen(moe_edge_version()) > 0 && strlen(moe_edge_isa()) > 0, "version/isa");
  printf("moe-edge %s, int8 kernels: %s\n", moe_edge_version(), moe_edge_isa());

  generate_like_rust(tiny, expected_tiny, "tiny model");
  generate_like_rust(pack, expected_pack, "int8 pack");

  moe_edge_model *model = NULL;
  CHECK(moe_edge_model_load(tiny, NULL, &model) == MOE_EDGE_OK, "load");
  CHECK(moe_edge_model_vocab_size(model) == 512, "vocab %zu", moe_edge_model_vocab_size(model));

  /* tokenize / detokenize, and buffers too small */
  int32_t ids[8];
  size_t n = 0;
  CHECK(moe_edge_tokenize(model, "t10 t20 t30", ids, 8, &n) == MOE_EDGE_OK && n == 3 && ids[0] == 10 &&
            ids[1] == 20 && ids[2] == 30, "tokenize: %zu ids", n);
  EXPECT_ERR(moe_edge_tokenize(model, "t10 t20 t30", ids, 2, &n), MOE_EDGE_ERR_BUFFER_TOO_SMALL);
  CHECK(n == 3, "needed %zu", n);
  char text[64];
  size_t len = 0;
  int32_t two[2] = {180, 355};
  CHECK(moe_edge_detokenize(model, two, 2, text, sizeof text, &len) == MOE_EDGE_OK && strcmp(text, "t180 t355") == 0 &&
            len == 9, "detokenize '%s'", text);
  EXPECT_ERR(moe_edge_detokenize(model, two, 2, text, 5, &len), MOE_EDGE_ERR_BUFFER_TOO_SMALL);
  CHECK(len == 9, "needed %zu", len);
  int32_t bad_ids[2] = {10, 512};
  EXPECT_ERR(moe_edge_detokenize(model, bad_ids, 2, text, sizeof text, &len), MOE_EDGE_ERR_INVALID_ARGUMENT);

  /* stop from the callback; a second use of a busy session is refused */
  moe_edge_session *session = NULL;
  CHECK(moe_edge_session_new(model, &session) == MOE_EDGE_OK, "session");
  moe_edge_generate_params gp = moe_edge_generate_default_params();
  gp.max_tokens = 100;
  collector c = {.stop_after = 3, .session = session};
  moe_edge_generation_stats st = moe_edge_generation_stats_init();
  CHECK(moe_edge_generate(session, "t10 t20", &gp, collect, &c, &st) == MOE_EDGE_OK, "generate");
  CHECK(c.pieces == 3 && st.stop_reason == MOE_EDGE_STOP_CANCELLED && st.generated_tokens == 3,
        "callback stop: %d pieces, reason %d, %u tokens", c.pieces, st.stop_reason, st.generated_tokens);
  CHECK(c.reentrant == MOE_EDGE_ERR_BUSY, "re-entrant use gave %d", c.reentrant);

  /* moe_edge_cancel from another thread */
  moe_edge_session_reset(session);
  cancel_state cs = {.session = session};
  pthread_t thread;
  pthread_create(&thread, NULL, canceller, &cs);
  gp.max_tokens = 200;
  CHECK(moe_edge_generate(session, "t10 t20", &gp, wait_for_cancel, &cs, &st) == MOE_EDGE_OK, "generate");
  pthread_join(thread, NULL);
  CHECK(st.stop_reason == MOE_EDGE_STOP_CANCELLED && st.generated_tokens < 200 && cs.pieces == 1,
        "cancel: reason %d, %u tokens, %d pieces", st.stop_reason, st.generated_tokens, cs.pieces);

  /* error paths: NULL for every pointer, bad strings, bad params, missing and damaged models */
  moe_edge_model *none = NULL;
  EXPECT_ERR(moe_edge_model_load(NULL, NULL, &none), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_model_load(tiny, NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_model_load("/nonexistent/model", NULL, &none), MOE_EDGE_ERR_MODEL);
  CHECK(none == NULL, "out stays NULL");
  CHECK(strstr(moe_edge_last_error(), "/nonexistent/model") != NULL, "the error names the path");
  EXPECT_ERR(moe_edge_model_load(damaged, NULL, &none), MOE_EDGE_ERR_MODEL);
  CHECK(strstr(moe_edge_last_error(), "experts.bin") != NULL, "the error names the expert file");
  EXPECT_ERR(moe_edge_model_load("\xff\xfe", NULL, &none), MOE_EDGE_ERR_INVALID_ARGUMENT);
  moe_edge_model_params mp = moe_edge_model_default_params();
  mp.struct_size = 3;
  EXPECT_ERR(moe_edge_model_load(tiny, &mp, &none), MOE_EDGE_ERR_INVALID_ARGUMENT);
  mp = moe_edge_model_default_params();
  mp.expert_cache_mb = -5;
  EXPECT_ERR(moe_edge_model_load(tiny, &mp, &none), MOE_EDGE_ERR_INVALID_ARGUMENT);
  moe_edge_session *s2 = NULL;
  EXPECT_ERR(moe_edge_session_new(NULL, &s2), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_session_new(model, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_tokenize(NULL, "t1", ids, 8, &n), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_tokenize(model, NULL, ids, 8, &n), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_tokenize(model, "t1", NULL, 8, &n), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_tokenize(model, "t1", ids, 8, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_tokenize(model, "t1 \xc3", ids, 8, &n), MOE_EDGE_ERR_INVALID_ARGUMENT);
  EXPECT_ERR(moe_edge_detokenize(NULL, two, 2, text, sizeof text, &len), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_detokenize(model, NULL, 2, text, sizeof text, &len), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_detokenize(model, two, 2, NULL, sizeof text, &len), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_detokenize(model, two, 2, text, sizeof text, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_generate(NULL, "t1", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_generate(session, NULL, NULL, NULL, NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_generate(session, "t1 \xff", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_INVALID_ARGUMENT);
  gp = moe_edge_generate_default_params();
  gp.temperature = -1.0f;
  EXPECT_ERR(moe_edge_generate(session, "t1", &gp, NULL, NULL, NULL), MOE_EDGE_ERR_INVALID_ARGUMENT);
  gp = moe_edge_generate_default_params();
  gp.max_tokens = 0;
  EXPECT_ERR(moe_edge_generate(session, "t1", &gp, NULL, NULL, NULL), MOE_EDGE_ERR_INVALID_ARGUMENT);
  moe_edge_generation_stats bad_stats = {.struct_size = 1};
  EXPECT_ERR(moe_edge_generate(session, "t1", NULL, NULL, NULL, &bad_stats), MOE_EDGE_ERR_INVALID_ARGUMENT);
  EXPECT_ERR(moe_edge_cancel(NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_session_reset(NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_model_cache_stats(NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_model_cache_stats(model, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  moe_edge_cache_stats bad_cache = {.struct_size = 8};
  EXPECT_ERR(moe_edge_model_cache_stats(model, &bad_cache), MOE_EDGE_ERR_INVALID_ARGUMENT);
  CHECK(moe_edge_model_vocab_size(NULL) == 0, "vocab of NULL");
  EXPECT_ERR(moe_edge_chat(NULL, NULL, "hi", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_chat(session, NULL, NULL, NULL, NULL, NULL, NULL), MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_chat_apply_template(NULL, &(moe_edge_chat_message){"user", "hi"}, 1, true, text, sizeof text, &len),
             MOE_EDGE_ERR_NULL_ARGUMENT);
  EXPECT_ERR(moe_edge_chat_apply_template(model, NULL, 1, true, text, sizeof text, &len), MOE_EDGE_ERR_NULL_ARGUMENT);
  /* the tiny model's tokenizer has no chat template */
  EXPECT_ERR(moe_edge_chat(session, NULL, "hi", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_INVALID_ARGUMENT);
  moe_edge_session *fresh = NULL;
  moe_edge_session_new(model, &fresh);
  EXPECT_ERR(moe_edge_chat(fresh, NULL, "hi", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_UNSUPPORTED);
  moe_edge_chat_message one = {"user", "hi"};
  EXPECT_ERR(moe_edge_chat_apply_template(model, &one, 1, true, text, sizeof text, &len), MOE_EDGE_ERR_UNSUPPORTED);
  moe_edge_session_free(fresh);
  moe_edge_session_free(session);
  moe_edge_model_free(model);
  moe_edge_model_free(NULL);
  moe_edge_session_free(NULL);

  /* a conversation: turn 2 feeds only what the cache does not hold */
  moe_edge_model *chat_model = NULL;
  CHECK(moe_edge_model_load(chat_dir, NULL, &chat_model) == MOE_EDGE_OK, "chat model");
  if (chat_model) {
    moe_edge_session *conv = NULL;
    moe_edge_session_new(chat_model, &conv);
    gp = moe_edge_generate_default_params();
    gp.max_tokens = 12;
    collector r1 = {0}, r2 = {0};
    moe_edge_generation_stats s1 = moe_edge_generation_stats_init(), s2st = moe_edge_generation_stats_init();
    CHECK(moe_edge_chat(conv, "Be brief.", "What does tar do?", &gp, collect, &r1, &s1) == MOE_EDGE_OK, "turn 1");
    CHECK(moe_edge_chat(conv, NULL, "And gzip?", &gp, collect, &r2, &s2st) == MOE_EDGE_OK, "turn 2");
    moe_edge_chat_message history[4] = {
        {"system", "Be brief."}, {"user", "What does tar do?"}, {"assistant", r1.text}, {"user", "And gzip?"}};
    char rendered[8192];
    CHECK(moe_edge_chat_apply_template(chat_model, history, 4, true, rendered, sizeof rendered, &len) == MOE_EDGE_OK,
          "template");
    CHECK(strstr(rendered, "<|im_start|>assistant") != NULL, "rendered: %s", rendered);
    /* the whole history is len bytes (byte-level tokenizer: about one token per byte); turn 2
     * fed only its tail */
    CHECK(s2st.prompt_tokens > 0 && s2st.prompt_tokens < s1.prompt_tokens + 20 && s2st.prompt_tokens < len / 2,
          "turn 2 fed %u tokens (turn 1: %u, history: %zu bytes)", s2st.prompt_tokens, s1.prompt_tokens, len);
    EXPECT_ERR(moe_edge_generate(conv, "t1", NULL, NULL, NULL, NULL), MOE_EDGE_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(moe_edge_chat_apply_template(chat_model, history, 4, true, rendered, 4, &len),
               MOE_EDGE_ERR_BUFFER_TOO_SMALL);
    moe_edge_chat_message bad = {NULL, "x"};
    EXPECT_ERR(moe_edge_chat_apply_template(chat_model, &bad, 1, true, rendered, sizeof rendered, &len),
               MOE_EDGE_ERR_NULL_ARGUMENT);
    moe_edge_session_free(conv);
    moe_edge_model_free(chat_model);
  }

  free(expected_tiny);
  free(expected_pack);
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
