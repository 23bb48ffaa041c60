/* Every libedgehal call on good and bad arguments.
 * Usage: api_test shrink.onnx shrink_dyn.onnx matmul.onnx
 * The shrink models compute y = Shrink(x; bias=1, lambd=0.5) over float32[2,3] / float32[N,3];
 * matmul.onnx computes y = x W with W = [[1,2],[3,4],[5,6]] (float32[2,3] -> float32[2,2]).
 * With EDGEHAL_DRIVER_PATH set (capi.rs points it at the example plugin and at a plugin built
 * for the wrong ABI), the device list must show both, the second as unavailable.
 * Exits 0 when every check passed; prints each failed check. Built and run by ffi/tests/capi.rs
 * normally, under AddressSanitizer and under valgrind. */
#define _GNU_SOURCE /* memfd_create */
#include <edgehal.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    checks++;                                                                        \
    if (!(cond)) {                                                                   \
      failures++;                                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
              #cond, edgehal_last_error_message());                                  \
    }                                                                                \
  } while (0)

/* The call returns `want` and, for errors, leaves a non-empty message. */
#define EXPECT(call, want)                                                           \
  do {                                                                               \
    edgehal_status st_ = (call);                                                     \
    checks++;                                                                        \
    if (st_ != (want)) {                                                             \
      failures++;                                                                    \
      fprintf(stderr, "%s:%d: %s returned %d (%s: %s), expected %d\n", __FILE__, __LINE__, \
              #call, st_, edgehal_status_message(st_), edgehal_last_error_message(), (int)(want)); \
    } else if ((want) != EDGEHAL_OK && edgehal_last_error_message()[0] == '\0') {    \
      failures++;                                                                    \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #call); \
    }                                                                                \
  } while (0)

static float shrink_ref(float x) { return x > 0.5f ? x - 1.0f : (x < -0.5f ? x + 1.0f : 0.0f); }

static const float X[6] = {2.0f, 0.25f, -3.0f, 0.5f, -0.75f, 10.0f};

static void check_y(const float *y, size_t n, const char *what) {
  for (size_t i = 0; i < n; i++) {
    if (fabsf(y[i] - shrink_ref(X[i % 6])) > 1e-6f) {
      failures++;
      fprintf(stderr, "%s: y[%zu] = %g, expected %g\n", what, i, y[i], shrink_ref(X[i % 6]));
    }
  }
  checks++;
}

static void test_version_and_status(void) {
  CHECK(strcmp(edgehal_version(), "0.1.0") == 0 || edgehal_version()[0] != '\0');
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", EDGEHAL_VERSION_MAJOR, EDGEHAL_VERSION_MINOR,
           EDGEHAL_VERSION_PATCH);
  CHECK(strcmp(edgehal_version(), want) == 0);
  CHECK(strcmp(edgehal_status_message(EDGEHAL_OK), "ok") == 0);
  CHECK(strcmp(edgehal_status_message(EDGEHAL_ERR_SHAPE_MISMATCH), "shape mismatch") == 0);
  CHECK(strcmp(edgehal_status_message(-1), "unknown status code") == 0);
  CHECK(strcmp(edgehal_status_message(123456), "unknown status code") == 0);
  CHECK(EDGEHAL_ERR_NULL_ARGUMENT >= 7000 && EDGEHAL_ERR_PANIC < 7100);
  CHECK(edgehal_dtype_size(EDGEHAL_DTYPE_FLOAT32) == 4);
  CHECK(edgehal_dtype_size(EDGEHAL_DTYPE_INT64) == 8);
  CHECK(edgehal_dtype_size(EDGEHAL_DTYPE_UNKNOWN) == 0);
  CHECK(edgehal_dtype_size(-7) == 0);
  CHECK(strcmp(edgehal_dtype_name(EDGEHAL_DTYPE_INT8), "int8") == 0);
  CHECK(strcmp(edgehal_dtype_name(999), "unknown") == 0);
}

static void test_runtime_and_devices(void) {
  edgehal_runtime *rt = NULL;
  EXPECT(edgehal_runtime_create(NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  CHECK(rt != NULL);
  CHECK(edgehal_last_error_message()[0] == '\0');

  size_t n = 0;
  EXPECT(edgehal_runtime_device_count(NULL, &n), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_runtime_device_count(rt, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_runtime_device_count(rt, &n), EDGEHAL_OK);
  CHECK(n >= 1);

  const edgehal_device *dev = NULL;
  EXPECT(edgehal_runtime_device(rt, 0, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_runtime_device(rt, n, &dev), EDGEHAL_ERR_NOT_FOUND);
  CHECK(dev == NULL); /* out-parameters are written only on success */
  EXPECT(edgehal_runtime_device(rt, 0, &dev), EDGEHAL_OK);
  edgehal_device_info info;
  memset(&info, 0, sizeof info);
  EXPECT(edgehal_device_get_info(dev, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_device_get_info(NULL, &info), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_device_get_info(dev, &info), EDGEHAL_OK);
  CHECK(strcmp(info.name, "cpu") == 0);
  CHECK(info.kind == EDGEHAL_DEVICE_CPU);
  CHECK(info.compute_units >= 1);
  CHECK(strstr(info.description, "CPU") != NULL);

  CHECK(strcmp(info.driver, "cpu") == 0);
  CHECK(info.available == 1 && info.reason[0] == '\0');

  /* Every device the probe found, available or not, with consistent fields. */
  int saw_example = 0, saw_bad_plugin = 0;
  for (size_t i = 0; i < n; i++) {
    const edgehal_device *d = NULL;
    edgehal_device_info di;
    memset(&di, 0, sizeof di);
    EXPECT(edgehal_runtime_device(rt, i, &d), EDGEHAL_OK);
    EXPECT(edgehal_device_get_info(d, &di), EDGEHAL_OK);
    CHECK(di.name && di.name[0] && di.description && di.driver && di.driver[0] &&
          di.kernel_driver && di.reason);
    CHECK(di.kind >= EDGEHAL_DEVICE_CPU && di.kind <= EDGEHAL_DEVICE_OTHER);
    CHECK(di.available == 0 || di.available == 1);
    CHECK(di.available ? di.reason[0] == '\0' : strncmp(di.reason, "unavailable", 11) == 0);
    CHECK((di.kind == EDGEHAL_DEVICE_CPU) == (i == 0)); /* the CPU once, first */
    if (strcmp(di.name, "example0") == 0) {
      saw_example = 1;
      CHECK(strcmp(di.driver, "example") == 0 && di.available == 1);
    }
    if (strcmp(di.driver, "plugin") == 0 && !di.available) {
      saw_bad_plugin = 1;
      CHECK(strstr(di.reason, "ABI version 99") != NULL);
    }
  }
  if (getenv("EDGEHAL_DRIVER_PATH")) {
    CHECK(saw_example);
    CHECK(saw_bad_plugin);
  } else {
    CHECK(!saw_example && !saw_bad_plugin);
  }

  /* A handle of the wrong kind is refused, not misread. */
  EXPECT(edgehal_runtime_device_count((const edgehal_runtime *)dev, &n), EDGEHAL_ERR_INVALID_HANDLE);
  /* A pointer that never came from libedgehal is refused. */
  int not_a_handle = 0;
  EXPECT(edgehal_runtime_device_count((const edgehal_runtime *)&not_a_handle, &n),
         EDGEHAL_ERR_INVALID_HANDLE);

  EXPECT(edgehal_runtime_release(NULL), EDGEHAL_OK);
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);
  /* Double release and use after release are detected. */
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_runtime_device_count(rt, &n), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_device_get_info(dev, &info), EDGEHAL_ERR_INVALID_HANDLE);
}

static void *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  void *p = malloc((size_t)n);
  if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
    free(p);
    p = NULL;
  }
  fclose(f);
  *len = (size_t)n;
  return p;
}

static void test_model(const char *path) {
  edgehal_runtime *rt = NULL;
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  edgehal_model *m = NULL;
  EXPECT(edgehal_model_load(NULL, path, &m), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_model_load(rt, NULL, &m), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_model_load(rt, path, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_model_load(rt, "", &m), EDGEHAL_ERR_INVALID_ARGUMENT);
  EXPECT(edgehal_model_load(rt, "/nonexistent/model.onnx", &m), EDGEHAL_ERR_IO);
  CHECK(strstr(edgehal_last_error_message(), "/nonexistent/model.onnx") != NULL);
  CHECK(m == NULL);

  size_t len = 0;
  unsigned char *bytes = read_file(path, &len);
  CHECK(bytes != NULL && len > 0);
  EXPECT(edgehal_model_load_memory(rt, NULL, len, &m), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_model_load_memory(rt, bytes, 0, &m), EDGEHAL_ERR_SIZE_MISMATCH);
  EXPECT(edgehal_model_load_memory(rt, bytes, len, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  /* A truncated model is a parse error, not a crash. */
  EXPECT(edgehal_model_load_memory(rt, bytes, len / 2, &m), EDGEHAL_ERR_PARSE);
  unsigned char garbage[64];
  memset(garbage, 0xff, sizeof garbage);
  edgehal_status st = edgehal_model_load_memory(rt, garbage, sizeof garbage, &m);
  CHECK(st == EDGEHAL_ERR_PARSE || st == EDGEHAL_ERR_INVALID_MODEL);
  EXPECT(edgehal_model_load_memory(rt, bytes, len, &m), EDGEHAL_OK);
  free(bytes); /* the model copied them */

  edgehal_model *m2 = NULL;
  EXPECT(edgehal_model_load(rt, path, &m2), EDGEHAL_OK);
  /* Models outlive the runtime's handle. */
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);

  edgehal_session_options opts;
  EXPECT(edgehal_session_options_init(NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_options_init(&opts), EDGEHAL_OK);
  CHECK(opts.struct_size == sizeof opts && opts.threads == 0 && opts.device == NULL && opts.optimize);

  edgehal_session *s = NULL;
  EXPECT(edgehal_session_create(NULL, &opts, &s), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_create(m, &opts, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  opts.struct_size = 4;
  EXPECT(edgehal_session_create(m, &opts, &s), EDGEHAL_ERR_SIZE_MISMATCH);
  opts.struct_size = sizeof opts;
  opts.device = "tpu9";
  EXPECT(edgehal_session_create(m, &opts, &s), EDGEHAL_ERR_NOT_FOUND);
  opts.device = "cpu";
  opts.threads = 100000;
  EXPECT(edgehal_session_create(m, &opts, &s), EDGEHAL_ERR_INVALID_ARGUMENT);
  opts.threads = 2;
  CHECK(s == NULL);
  EXPECT(edgehal_session_create(m, &opts, &s), EDGEHAL_OK);
  edgehal_session *s_default = NULL;
  EXPECT(edgehal_session_create(m2, NULL, &s_default), EDGEHAL_OK);
  EXPECT(edgehal_session_release(s_default), EDGEHAL_OK);

  EXPECT(edgehal_model_release(m), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_model_release(m2), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s_default), EDGEHAL_ERR_INVALID_HANDLE);
  /* Wrong kind: a session passed as a model. */
  EXPECT(edgehal_model_release((edgehal_model *)s), EDGEHAL_ERR_INVALID_HANDLE);

  /* Introspection. */
  const char *devname = NULL;
  EXPECT(edgehal_session_device(s, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_device(s, &devname), EDGEHAL_OK);
  CHECK(devname && strcmp(devname, "cpu") == 0);
  size_t nin = 0, nout = 0;
  EXPECT(edgehal_session_io_count(NULL, &nin, &nout), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_io_count(s, &nin, &nout), EDGEHAL_OK);
  CHECK(nin == 1 && nout == 1);
  edgehal_tensor_info ti;
  EXPECT(edgehal_session_input_info(s, 0, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_input_info(s, 1, &ti), EDGEHAL_ERR_NOT_FOUND);
  EXPECT(edgehal_session_output_info(s, 7, &ti), EDGEHAL_ERR_NOT_FOUND);
  EXPECT(edgehal_session_input_info(s, 0, &ti), EDGEHAL_OK);
  CHECK(strcmp(ti.name, "x") == 0);
  CHECK(ti.dtype == EDGEHAL_DTYPE_FLOAT32);
  CHECK(ti.rank == 2 && ti.shape && ti.shape[0] == 2 && ti.shape[1] == 3);
  CHECK(ti.quantization == EDGEHAL_QUANT_NONE);
  EXPECT(edgehal_session_output_info(s, 0, &ti), EDGEHAL_OK);
  CHECK(strcmp(ti.name, "y") == 0 && ti.dtype == EDGEHAL_DTYPE_FLOAT32);
  size_t idx = 99;
  EXPECT(edgehal_session_find(s, "x", false, &idx), EDGEHAL_OK);
  CHECK(idx == 0);
  EXPECT(edgehal_session_find(s, "y", true, &idx), EDGEHAL_OK);
  CHECK(idx == 0);
  EXPECT(edgehal_session_find(s, "y", false, &idx), EDGEHAL_ERR_NOT_FOUND);
  EXPECT(edgehal_session_find(s, NULL, false, &idx), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_find(s, "x", false, NULL), EDGEHAL_ERR_NULL_ARGUMENT);

  /* Buffers: wrap (zero-copy), copy, create. */
  int64_t shape[2] = {2, 3};
  float x[6];
  memcpy(x, X, sizeof x);
  edgehal_buffer *in = NULL, *in_copy = NULL, *out = NULL;
  EXPECT(edgehal_buffer_wrap(NULL, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, NULL, 2, &in), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_wrap(x, sizeof x - 1, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in), EDGEHAL_ERR_BUFFER_TOO_SMALL);
  EXPECT(edgehal_buffer_wrap(x, sizeof x, 42, shape, 2, &in), EDGEHAL_ERR_INVALID_ARGUMENT);
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, EDGEHAL_MAX_RANK + 1, &in),
         EDGEHAL_ERR_SIZE_MISMATCH);
  int64_t neg[2] = {2, -3};
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, neg, 2, &in), EDGEHAL_ERR_INVALID_ARGUMENT);
  int64_t huge[2] = {INT64_MAX, INT64_MAX};
  EXPECT(edgehal_buffer_create(EDGEHAL_DTYPE_FLOAT32, huge, 2, &out), EDGEHAL_ERR_TOO_LARGE);
  CHECK(in == NULL && out == NULL);
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in), EDGEHAL_OK);
  void *data = NULL;
  size_t size = 0;
  EXPECT(edgehal_buffer_data(in, &data, &size), EDGEHAL_OK);
  CHECK(data == (void *)x && size == sizeof x); /* really zero-copy */
  EXPECT(edgehal_buffer_copy(x, sizeof x + 4, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in_copy), EDGEHAL_ERR_SIZE_MISMATCH);
  EXPECT(edgehal_buffer_copy(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in_copy), EDGEHAL_OK);
  EXPECT(edgehal_buffer_data(in_copy, &data, &size), EDGEHAL_OK);
  CHECK(data != (void *)x && size == sizeof x && memcmp(data, x, sizeof x) == 0);
  edgehal_dtype dt = 0;
  EXPECT(edgehal_buffer_dtype(in_copy, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_dtype(in_copy, &dt), EDGEHAL_OK);
  CHECK(dt == EDGEHAL_DTYPE_FLOAT32);
  int64_t dims[EDGEHAL_MAX_RANK];
  size_t rank = 0;
  EXPECT(edgehal_buffer_shape(in_copy, dims, 1, &rank), EDGEHAL_ERR_BUFFER_TOO_SMALL);
  CHECK(rank == 2);
  EXPECT(edgehal_buffer_shape(in_copy, dims, EDGEHAL_MAX_RANK, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_shape(in_copy, dims, EDGEHAL_MAX_RANK, &rank), EDGEHAL_OK);
  CHECK(rank == 2 && dims[0] == 2 && dims[1] == 3);

  /* Run with a library-allocated output. */
  const edgehal_buffer *ins[1] = {in};
  edgehal_buffer *outs[1] = {NULL};
  EXPECT(edgehal_session_run(NULL, ins, 1, outs, 1), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_run(s, NULL, 1, outs, 1), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_run(s, ins, 0, outs, 1), EDGEHAL_ERR_SIZE_MISMATCH);
  EXPECT(edgehal_session_run(s, ins, 2, outs, 1), EDGEHAL_ERR_SIZE_MISMATCH);
  EXPECT(edgehal_session_run(s, ins, 1, outs, 0), EDGEHAL_ERR_SIZE_MISMATCH);
  EXPECT(edgehal_session_run(s, ins, 1, NULL, 1), EDGEHAL_ERR_NULL_ARGUMENT);
  const edgehal_buffer *null_ins[1] = {NULL};
  EXPECT(edgehal_session_run(s, null_ins, 1, outs, 1), EDGEHAL_ERR_NULL_ARGUMENT);
  CHECK(outs[0] == NULL);
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_OK);
  CHECK(outs[0] != NULL);
  EXPECT(edgehal_buffer_data(outs[0], &data, &size), EDGEHAL_OK);
  CHECK(size == 6 * sizeof(float));
  check_y(data, 6, "run (allocated output)");
  EXPECT(edgehal_buffer_shape(outs[0], dims, EDGEHAL_MAX_RANK, &rank), EDGEHAL_OK);
  CHECK(rank == 2 && dims[0] == 2 && dims[1] == 3);
  EXPECT(edgehal_buffer_release(outs[0]), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(outs[0]), EDGEHAL_ERR_INVALID_HANDLE);

  /* Run into caller memory (zero-copy output binding). */
  float y[6] = {0};
  EXPECT(edgehal_buffer_wrap(y, sizeof y, EDGEHAL_DTYPE_FLOAT32, shape, 2, &out), EDGEHAL_OK);
  outs[0] = out;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_OK);
  CHECK(outs[0] == out);
  check_y(y, 6, "run (wrapped output)");
  /* Copied input gives the same result. */
  memset(y, 0, sizeof y);
  ins[0] = in_copy;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_OK);
  check_y(y, 6, "run (copied input)");

  /* Wrong dtype, wrong shape, too-small output, released buffer. */
  int32_t xi[6] = {0};
  edgehal_buffer *in_i32 = NULL, *in_bad_shape = NULL, *out_small = NULL, *out_i32 = NULL;
  EXPECT(edgehal_buffer_wrap(xi, sizeof xi, EDGEHAL_DTYPE_INT32, shape, 2, &in_i32), EDGEHAL_OK);
  ins[0] = in_i32;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_DTYPE_MISMATCH);
  CHECK(strstr(edgehal_last_error_message(), "'x'") != NULL);
  int64_t shape32[2] = {3, 2};
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape32, 2, &in_bad_shape), EDGEHAL_OK);
  ins[0] = in_bad_shape;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_SHAPE_MISMATCH);
  ins[0] = in;
  int64_t shape1[1] = {5};
  EXPECT(edgehal_buffer_create(EDGEHAL_DTYPE_FLOAT32, shape1, 1, &out_small), EDGEHAL_OK);
  outs[0] = out_small;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_BUFFER_TOO_SMALL);
  EXPECT(edgehal_buffer_create(EDGEHAL_DTYPE_INT32, shape, 2, &out_i32), EDGEHAL_OK);
  outs[0] = out_i32;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_DTYPE_MISMATCH);
  EXPECT(edgehal_buffer_release(in_i32), EDGEHAL_OK);
  ins[0] = in_i32;
  outs[0] = out;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_INVALID_HANDLE);
  /* A session passed as a buffer. */
  ins[0] = (const edgehal_buffer *)s;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_buffer_release(NULL), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in_bad_shape), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out_small), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out_i32), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in_copy), EDGEHAL_OK);

  /* A released session. */
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  ins[0] = in;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_session_release(s), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_session_release(NULL), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out), EDGEHAL_OK);
}

static void test_symbolic_batch(const char *path) {
  edgehal_runtime *rt = NULL;
  edgehal_model *m = NULL;
  edgehal_session *s = NULL;
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  EXPECT(edgehal_model_load(rt, path, &m), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s), EDGEHAL_OK);
  edgehal_tensor_info ti;
  EXPECT(edgehal_session_input_info(s, 0, &ti), EDGEHAL_OK);
  CHECK(ti.rank == 2 && ti.shape[0] == -1 && ti.shape[1] == 3);
  /* Batch of 4 (rows repeat X). */
  float x[4][3];
  for (int i = 0; i < 12; i++) x[i / 3][i % 3] = X[i % 6];
  int64_t shape[2] = {4, 3};
  edgehal_buffer *in = NULL, *out_big = NULL;
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in), EDGEHAL_OK);
  /* An output buffer larger than needed takes the output's shape. */
  int64_t cap[1] = {100};
  EXPECT(edgehal_buffer_create(EDGEHAL_DTYPE_FLOAT32, cap, 1, &out_big), EDGEHAL_OK);
  const edgehal_buffer *ins[1] = {in};
  edgehal_buffer *outs[1] = {out_big};
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_OK);
  int64_t dims[EDGEHAL_MAX_RANK];
  size_t rank = 0;
  EXPECT(edgehal_buffer_shape(out_big, dims, EDGEHAL_MAX_RANK, &rank), EDGEHAL_OK);
  CHECK(rank == 2 && dims[0] == 4 && dims[1] == 3);
  void *data = NULL;
  EXPECT(edgehal_buffer_data(out_big, &data, NULL), EDGEHAL_OK);
  check_y(data, 12, "symbolic batch");
  int64_t shape_bad[2] = {4, 2};
  edgehal_buffer *in_bad = NULL;
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape_bad, 2, &in_bad), EDGEHAL_OK);
  ins[0] = in_bad;
  EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_ERR_SHAPE_MISMATCH);
  EXPECT(edgehal_buffer_release(in_bad), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out_big), EDGEHAL_OK);
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_OK);
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);
}

/* ---- async ---- */

typedef struct {
  pthread_mutex_t lock;
  int calls;
  edgehal_status status;
  char message[256];
  pthread_t thread;
} done_state;

static void on_done(void *user_data, edgehal_status status, const char *message) {
  done_state *d = user_data;
  pthread_mutex_lock(&d->lock);
  d->calls++;
  d->status = status;
  snprintf(d->message, sizeof d->message, "%s", message ? message : "(null)");
  d->thread = pthread_self();
  pthread_mutex_unlock(&d->lock);
}

static void test_async(const char *path) {
  edgehal_runtime *rt = NULL;
  edgehal_model *m = NULL;
  edgehal_session *s = NULL;
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  EXPECT(edgehal_model_load(rt, path, &m), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s), EDGEHAL_OK);
  int64_t shape[2] = {2, 3};
  float x[6], y[6] = {0};
  memcpy(x, X, sizeof x);
  edgehal_buffer *in = NULL, *out = NULL;
  EXPECT(edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in), EDGEHAL_OK);
  EXPECT(edgehal_buffer_wrap(y, sizeof y, EDGEHAL_DTYPE_FLOAT32, shape, 2, &out), EDGEHAL_OK);
  const edgehal_buffer *ins[1] = {in};
  edgehal_buffer *outs[1] = {out};

  done_state d;
  memset(&d, 0, sizeof d);
  pthread_mutex_init(&d.lock, NULL);
  edgehal_fence *f = NULL;
  EXPECT(edgehal_session_submit(NULL, ins, 1, outs, 1, on_done, &d, &f), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_submit(s, ins, 2, outs, 1, on_done, &d, &f), EDGEHAL_ERR_SIZE_MISMATCH);
  edgehal_buffer *null_outs[1] = {NULL};
  EXPECT(edgehal_session_submit(s, ins, 1, null_outs, 1, on_done, &d, &f), EDGEHAL_ERR_NULL_ARGUMENT);
  CHECK(f == NULL && d.calls == 0);

  EXPECT(edgehal_session_submit(s, ins, 1, outs, 1, on_done, &d, &f), EDGEHAL_OK);
  CHECK(f != NULL);
  int fd = -1;
  EXPECT(edgehal_fence_fd(f, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_fence_fd(f, &fd), EDGEHAL_OK);
  CHECK(fd >= 0);
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int r = poll(&p, 1, 10000);
  CHECK(r == 1 && (p.revents & POLLIN));
  bool done = false;
  EXPECT(edgehal_fence_is_done(f, NULL), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_fence_is_done(f, &done), EDGEHAL_OK);
  CHECK(done);
  EXPECT(edgehal_fence_wait(f, 0), EDGEHAL_OK);
  EXPECT(edgehal_fence_wait(f, -1), EDGEHAL_OK);
  pthread_mutex_lock(&d.lock);
  CHECK(d.calls == 1 && d.status == EDGEHAL_OK && d.message[0] == '\0');
  CHECK(!pthread_equal(d.thread, pthread_self())); /* called on a worker thread */
  pthread_mutex_unlock(&d.lock);
  check_y(y, 6, "submit");
  EXPECT(edgehal_fence_release(f), EDGEHAL_OK);
  EXPECT(edgehal_fence_release(f), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_fence_wait(f, 0), EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_fence_wait(NULL, 0), EDGEHAL_ERR_NULL_ARGUMENT);

  /* A job that fails (wrong dtype) reports through callback and fence, with a message. */
  int32_t xi[6] = {0};
  edgehal_buffer *in_i32 = NULL;
  EXPECT(edgehal_buffer_wrap(xi, sizeof xi, EDGEHAL_DTYPE_INT32, shape, 2, &in_i32), EDGEHAL_OK);
  ins[0] = in_i32;
  memset(&d.message, 0, sizeof d.message);
  d.calls = 0;
  EXPECT(edgehal_session_submit(s, ins, 1, outs, 1, on_done, &d, &f), EDGEHAL_OK);
  EXPECT(edgehal_fence_wait(f, 10000), EDGEHAL_ERR_DTYPE_MISMATCH);
  CHECK(strstr(edgehal_last_error_message(), "int32") != NULL);
  pthread_mutex_lock(&d.lock);
  CHECK(d.calls == 1 && d.status == EDGEHAL_ERR_DTYPE_MISMATCH && strstr(d.message, "int32"));
  pthread_mutex_unlock(&d.lock);
  EXPECT(edgehal_fence_release(f), EDGEHAL_OK);

  /* No fence, callback only; and handles released while the job may still run. */
  ins[0] = in;
  memset(y, 0, sizeof y);
  d.calls = 0;
  edgehal_fence *f2 = NULL;
  EXPECT(edgehal_session_submit(s, ins, 1, outs, 1, NULL, NULL, &f2), EDGEHAL_OK);
  EXPECT(edgehal_session_submit(s, ins, 1, outs, 1, on_done, &d, NULL), EDGEHAL_OK);
  EXPECT(edgehal_fence_wait(f2, -1), EDGEHAL_OK);
  for (int i = 0; i < 10000; i++) { /* the second job signals only through the callback */
    pthread_mutex_lock(&d.lock);
    int c = d.calls;
    pthread_mutex_unlock(&d.lock);
    if (c) break;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  CHECK(d.calls == 1 && d.status == EDGEHAL_OK);
  check_y(y, 6, "submit without fence");
  EXPECT(edgehal_fence_release(f2), EDGEHAL_OK);

  /* Release everything right after submitting: the job keeps what it needs. */
  edgehal_fence *f3 = NULL;
  memset(y, 0, sizeof y);
  EXPECT(edgehal_session_submit(s, ins, 1, outs, 1, NULL, NULL, &f3), EDGEHAL_OK);
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out), EDGEHAL_OK);
  EXPECT(edgehal_fence_wait(f3, -1), EDGEHAL_OK);
  check_y(y, 6, "submit then release");
  EXPECT(edgehal_fence_release(f3), EDGEHAL_OK);

  EXPECT(edgehal_buffer_release(in_i32), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_OK);
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);
  pthread_mutex_destroy(&d.lock);
}

/* Many threads use one session at once. */
typedef struct {
  const edgehal_session *s;
  int ok;
} worker_arg;

static void *worker(void *p) {
  worker_arg *a = p;
  int64_t shape[2] = {2, 3};
  float x[6], y[6];
  memcpy(x, X, sizeof x);
  a->ok = 1;
  for (int i = 0; i < 20; i++) {
    edgehal_buffer *in = NULL, *out = NULL;
    memset(y, 0, sizeof y);
    if (edgehal_buffer_wrap(x, sizeof x, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in) != EDGEHAL_OK ||
        edgehal_buffer_wrap(y, sizeof y, EDGEHAL_DTYPE_FLOAT32, shape, 2, &out) != EDGEHAL_OK) {
      a->ok = 0;
    }
    const edgehal_buffer *ins[1] = {in};
    edgehal_buffer *outs[1] = {out};
    if (edgehal_session_run(a->s, ins, 1, outs, 1) != EDGEHAL_OK) a->ok = 0;
    for (int k = 0; k < 6; k++)
      if (fabsf(y[k] - shrink_ref(X[k])) > 1e-6f) a->ok = 0;
    edgehal_buffer_release(in);
    edgehal_buffer_release(out);
  }
  return NULL;
}

static void test_threads(const char *path) {
  edgehal_runtime *rt = NULL;
  edgehal_model *m = NULL;
  edgehal_session *s = NULL;
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  EXPECT(edgehal_model_load(rt, path, &m), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s), EDGEHAL_OK);
  pthread_t t[4];
  worker_arg a[4];
  for (int i = 0; i < 4; i++) {
    a[i].s = s;
    a[i].ok = 0;
    pthread_create(&t[i], NULL, worker, &a[i]);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join(t[i], NULL);
    CHECK(a[i].ok);
  }
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_OK);
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);
}

/* A memfd of `size` bytes, mapped shared into *map. */
static int make_memfd(size_t size, float **map) {
  int fd = memfd_create("api_test", MFD_CLOEXEC);
  if (fd < 0) return -1;
  if (ftruncate(fd, (off_t)size) != 0) {
    close(fd);
    return -1;
  }
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    close(fd);
    return -1;
  }
  *map = p;
  return fd;
}

static void test_fd_import(const char *shrink_path, const char *matmul_path) {
  const int64_t shape[2] = {2, 3};
  const int64_t yshape[2] = {2, 2};
  const size_t page = 4096, size = 2 * 4096;
  float *map = NULL;
  int fd = make_memfd(size, &map);
  CHECK(fd >= 0);
  if (fd < 0) return;
  edgehal_buffer *b = NULL;

  /* Bad arguments. */
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2, NULL),
         EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_import_fd(-1, EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2, &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  CHECK(strstr(edgehal_last_error_message(), "negative") != NULL);
  EXPECT(edgehal_buffer_import_fd(fd, 7, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2, &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, NULL, 2, &b),
         EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, 0, 20, EDGEHAL_DTYPE_FLOAT32, shape, 2, &b),
         EDGEHAL_ERR_BUFFER_TOO_SMALL);
  /* Past the end of the memfd. */
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, size - 8, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2,
                                  &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  CHECK(strstr(edgehal_last_error_message(), "past the end") != NULL);
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, UINT64_MAX, 24, EDGEHAL_DTYPE_FLOAT32, shape,
                                  2, &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  /* Not a memfd (a pipe), a memfd claimed to be a dma-buf, a closed fd. */
  int pfd[2];
  CHECK(pipe(pfd) == 0);
  EXPECT(edgehal_buffer_import_fd(pfd[0], EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2,
                                  &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  CHECK(strstr(edgehal_last_error_message(), "not a memfd") != NULL);
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_DMABUF, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2, &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  CHECK(strstr(edgehal_last_error_message(), "not a dma-buf") != NULL);
  close(pfd[0]);
  close(pfd[1]);
  EXPECT(edgehal_buffer_import_fd(pfd[0], EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2,
                                  &b),
         EDGEHAL_ERR_INVALID_ARGUMENT);
  CHECK(b == NULL);

  /* Input at offset 0, output at offset 4096 of the same memfd. The fd is borrowed: closing
   * ours right after the imports leaves the buffers usable. */
  edgehal_buffer *in = NULL, *out = NULL;
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2, &in),
         EDGEHAL_OK);
  EXPECT(edgehal_buffer_import_fd(fd, EDGEHAL_FD_MEMFD, page, 16, EDGEHAL_DTYPE_FLOAT32, yshape, 2,
                                  &out),
         EDGEHAL_OK);
  close(fd);
  memcpy(map, X, sizeof X);
  void *data = NULL;
  size_t dsize = 0;
  EXPECT(edgehal_buffer_data(in, &data, &dsize), EDGEHAL_OK);
  CHECK(dsize == 24 && data != NULL && memcmp(data, X, sizeof X) == 0); /* the same pages */

  edgehal_runtime *rt = NULL;
  edgehal_model *m = NULL;
  edgehal_session *s = NULL;
  EXPECT(edgehal_runtime_create(&rt), EDGEHAL_OK);
  EXPECT(edgehal_model_load(rt, matmul_path, &m), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s), EDGEHAL_OK);
  uint64_t copies = 99, bytes = 99;
  EXPECT(edgehal_session_copy_stats(NULL, &copies, &bytes), EDGEHAL_ERR_NULL_ARGUMENT);
  EXPECT(edgehal_session_copy_stats((const edgehal_session *)rt, &copies, &bytes),
         EDGEHAL_ERR_INVALID_HANDLE);
  EXPECT(edgehal_session_copy_stats(s, NULL, NULL), EDGEHAL_OK);
  EXPECT(edgehal_session_copy_stats(s, &copies, &bytes), EDGEHAL_OK);
  CHECK(copies == 0 && bytes == 0);
  const edgehal_buffer *ins[1] = {in};
  edgehal_buffer *outs[1] = {out};
  for (int round = 0; round < 2; round++) {
    float xin[6];
    memcpy(xin, map, sizeof xin);
    EXPECT(edgehal_session_run(s, ins, 1, outs, 1), EDGEHAL_OK);
    CHECK(outs[0] == out);
    /* MatMul computed straight into the memfd: zero copies in, zero out. */
    EXPECT(edgehal_session_copy_stats(s, &copies, &bytes), EDGEHAL_OK);
    CHECK(copies == 0 && bytes == 0);
    const float *y = map + page / sizeof(float);
    const float W[6] = {1, 2, 3, 4, 5, 6};
    for (int r = 0; r < 2; r++)
      for (int c = 0; c < 2; c++) {
        float want = 0;
        for (int k = 0; k < 3; k++) want += xin[r * 3 + k] * W[k * 2 + c];
        CHECK(fabsf(y[r * 2 + c] - want) <= 1e-4f * (1.0f + fabsf(want)));
      }
    map[0] += 1.0f; /* a new frame in place: the next run sees it */
  }
  memcpy(map, X, sizeof X);
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_OK);

  /* Shrink cannot compute in place: one counted copy of its 24 output bytes. */
  edgehal_buffer *out2 = NULL;
  float *map2 = NULL;
  int fd2 = make_memfd(page, &map2);
  CHECK(fd2 >= 0);
  EXPECT(edgehal_buffer_import_fd(fd2, EDGEHAL_FD_MEMFD, 0, 24, EDGEHAL_DTYPE_FLOAT32, shape, 2,
                                  &out2),
         EDGEHAL_OK);
  if (fd2 >= 0) close(fd2);
  EXPECT(edgehal_model_load(rt, shrink_path, &m), EDGEHAL_OK);
  EXPECT(edgehal_session_create(m, NULL, &s), EDGEHAL_OK);
  edgehal_buffer *outs2[1] = {out2};
  EXPECT(edgehal_session_run(s, ins, 1, outs2, 1), EDGEHAL_OK);
  EXPECT(edgehal_session_copy_stats(s, &copies, &bytes), EDGEHAL_OK);
  CHECK(copies == 1 && bytes == 24);
  if (map2) check_y(map2, 6, "shrink into an imported memfd");
  /* The input's own buffer bound as the output (in-place processing of a frame): never
   * computed into while it is read; the result is copied in after the run. */
  edgehal_buffer *same[1] = {in};
  EXPECT(edgehal_session_run(s, ins, 1, same, 1), EDGEHAL_OK);
  check_y(map, 6, "shrink in place over its imported input");
  EXPECT(edgehal_session_copy_stats(s, &copies, &bytes), EDGEHAL_OK);
  CHECK(copies == 2 && bytes == 48);
  EXPECT(edgehal_session_release(s), EDGEHAL_OK);
  EXPECT(edgehal_model_release(m), EDGEHAL_OK);
  EXPECT(edgehal_runtime_release(rt), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(in), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out2), EDGEHAL_OK);
  EXPECT(edgehal_buffer_release(out2), EDGEHAL_ERR_INVALID_HANDLE);
  munmap(map, size);
  if (map2) munmap(map2, page);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s shrink.onnx shrink_dyn.onnx matmul.onnx\n", argv[0]);
    return 2;
  }
  test_version_and_status();
  test_runtime_and_devices();
  test_model(argv[1]);
  test_symbolic_batch(argv[2]);
  test_async(argv[1]);
  test_threads(argv[1]);
  test_fd_import(argv[1], argv[3]);
  printf("api_test: %d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
