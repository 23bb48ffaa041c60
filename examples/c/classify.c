/* classify: image classification with libedgehal, as on a Raspberry Pi.
 *
 *   classify MODEL IMAGE.png [DEVICE] [RUNS]
 *
 * Reads a PNG (libpng), resizes it bilinearly to the model's input size, normalises it with the
 * ImageNet mean/std into NCHW or NHWC (whichever the model's input shape says), runs the model
 * and prints the top-5 classes (softmax scores) and the latency.
 * Build: cc classify.c -o classify $(pkg-config --cflags --libs edgehal libpng) -lm
 * Exit status: 0 ok, 1 error, 3 the model needs an operator this edgehal lacks. */
#include <edgehal.h>

#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const float MEAN[3] = {0.485f, 0.456f, 0.406f};
static const float STDDEV[3] = {0.229f, 0.224f, 0.225f};

static int fail(const char *what, edgehal_status st) {
  fprintf(stderr, "error: %s: %s (%s)\n", what, edgehal_last_error_message(),
          edgehal_status_message(st));
  return st == EDGEHAL_ERR_UNSUPPORTED ? 3 : 1;
}

/* Decode a PNG into 8-bit RGB. Returns NULL on error. */
static unsigned char *read_png(const char *path, int *w, int *h) {
  png_image img;
  memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&img, path)) {
    fprintf(stderr, "error: %s: %s\n", path, img.message);
    return NULL;
  }
  img.format = PNG_FORMAT_RGB;
  unsigned char *rgb = malloc(PNG_IMAGE_SIZE(img));
  if (!rgb || !png_image_finish_read(&img, NULL, rgb, 0, NULL)) {
    fprintf(stderr, "error: %s: %s\n", path, img.message);
    free(rgb);
    png_image_free(&img);
    return NULL;
  }
  *w = (int)img.width;
  *h = (int)img.height;
  return rgb;
}

/* Bilinear sample (half-pixel centres, edges clamped) of channel c at output pixel (ox, oy). */
static float sample(const unsigned char *rgb, int w, int h, int ow, int oh, int ox, int oy, int c) {
  float sx = ((float)ox + 0.5f) * (float)w / (float)ow - 0.5f;
  float sy = ((float)oy + 0.5f) * (float)h / (float)oh - 0.5f;
  if (sx < 0) sx = 0;
  if (sy < 0) sy = 0;
  if (sx > (float)(w - 1)) sx = (float)(w - 1);
  if (sy > (float)(h - 1)) sy = (float)(h - 1);
  int x0 = (int)sx, y0 = (int)sy;
  int x1 = x0 + 1 < w ? x0 + 1 : x0, y1 = y0 + 1 < h ? y0 + 1 : y0;
  float fx = sx - (float)x0, fy = sy - (float)y0;
#define PX(x, y) ((float)rgb[((size_t)(y) * (size_t)w + (size_t)(x)) * 3 + (size_t)c])
  float top = PX(x0, y0) * (1 - fx) + PX(x1, y0) * fx;
  float bot = PX(x0, y1) * (1 - fx) + PX(x1, y1) * fx;
#undef PX
  return top * (1 - fy) + bot * fy;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 3 || argc > 5) {
    fprintf(stderr, "usage: %s MODEL IMAGE.png [DEVICE] [RUNS]\n", argv[0]);
    return 1;
  }
  const char *device = argc > 3 ? argv[3] : "auto";
  int runs = argc > 4 ? atoi(argv[4]) : 3;
  if (runs < 1) runs = 1;

  int rc = 1;
  edgehal_status st;
  edgehal_runtime *rt = NULL;
  edgehal_model *model = NULL;
  edgehal_session *s = NULL;
  edgehal_buffer *in = NULL, *out = NULL;
  unsigned char *rgb = NULL;
  float *x = NULL;

  if ((st = edgehal_runtime_create(&rt))) { rc = fail("runtime", st); goto done; }
  if ((st = edgehal_model_load(rt, argv[1], &model))) { rc = fail("load model", st); goto done; }
  edgehal_session_options opts;
  edgehal_session_options_init(&opts);
  opts.device = device;
  if ((st = edgehal_session_create(model, &opts, &s))) { rc = fail("create session", st); goto done; }

  edgehal_tensor_info ti;
  if ((st = edgehal_session_input_info(s, 0, &ti))) { rc = fail("input info", st); goto done; }
  if (ti.dtype != EDGEHAL_DTYPE_FLOAT32 || ti.rank != 4) {
    fprintf(stderr, "error: input '%s' is %s rank %d; expected a float32 image tensor of rank 4\n",
            ti.name, edgehal_dtype_name(ti.dtype), ti.rank);
    goto done;
  }
  int nchw = ti.shape[1] == 3;
  if (!nchw && ti.shape[3] != 3) {
    fprintf(stderr, "error: input '%s' has no 3-channel axis (neither NCHW nor NHWC)\n", ti.name);
    goto done;
  }
  int oh = (int)(nchw ? ti.shape[2] : ti.shape[1]);
  int ow = (int)(nchw ? ti.shape[3] : ti.shape[2]);
  if (oh <= 0) oh = 224; /* symbolic size: use the usual one */
  if (ow <= 0) ow = 224;

  int w = 0, h = 0;
  if (!(rgb = read_png(argv[2], &w, &h))) goto done;
  size_t n = (size_t)3 * (size_t)oh * (size_t)ow;
  if (!(x = malloc(n * sizeof *x))) goto done;
  for (int oy = 0; oy < oh; oy++)
    for (int ox = 0; ox < ow; ox++)
      for (int c = 0; c < 3; c++) {
        float v = (sample(rgb, w, h, ow, oh, ox, oy, c) / 255.0f - MEAN[c]) / STDDEV[c];
        size_t i = nchw ? ((size_t)c * (size_t)oh + (size_t)oy) * (size_t)ow + (size_t)ox
                        : ((size_t)oy * (size_t)ow + (size_t)ox) * 3 + (size_t)c;
        x[i] = v;
      }
  int64_t shape[4] = {1, nchw ? 3 : oh, nchw ? oh : ow, nchw ? ow : 3};
  /* Zero-copy: the session reads `x` in place. */
  if ((st = edgehal_buffer_wrap(x, n * sizeof *x, EDGEHAL_DTYPE_FLOAT32, shape, 4, &in))) {
    rc = fail("wrap input", st);
    goto done;
  }

  const char *devname = "?";
  edgehal_session_device(s, &devname);
  printf("model: %s (input '%s' float32[1,%lld,%lld,%lld], %s), device %s\n", argv[1], ti.name,
         (long long)shape[1], (long long)shape[2], (long long)shape[3], nchw ? "NCHW" : "NHWC",
         devname);
  printf("image: %s (%dx%d) -> %dx%d\n", argv[2], w, h, ow, oh);

  double *times = calloc((size_t)runs, sizeof *times);
  if (!times) goto done;
  const edgehal_buffer *ins[1] = {in};
  for (int r = 0; r < runs; r++) {
    edgehal_buffer *outs[1] = {NULL}; /* libedgehal allocates the output */
    double t0 = now_ms();
    st = edgehal_session_run(s, ins, 1, outs, 1);
    times[r] = now_ms() - t0;
    if (st) {
      free(times);
      rc = fail("run", st);
      goto done;
    }
    edgehal_buffer_release(out);
    out = outs[0];
  }
  qsort(times, (size_t)runs, sizeof *times, cmp_double);
  double median = times[runs / 2];
  free(times);

  edgehal_dtype odt = 0;
  void *odata = NULL;
  edgehal_buffer_dtype(out, &odt);
  int64_t dims[EDGEHAL_MAX_RANK];
  size_t rank = 0, k = 1;
  edgehal_buffer_shape(out, dims, EDGEHAL_MAX_RANK, &rank);
  for (size_t i = 0; i < rank; i++) k *= (size_t)dims[i];
  edgehal_buffer_data(out, &odata, NULL);
  if (odt != EDGEHAL_DTYPE_FLOAT32 || k == 0) {
    fprintf(stderr, "error: output is %s with %zu values; expected float32 scores\n",
            edgehal_dtype_name(odt), k);
    goto done;
  }
  const float *logits = odata;
  /* Softmax (shifted by the max for stability), then the 5 best. */
  float mx = logits[0];
  for (size_t i = 1; i < k; i++) mx = logits[i] > mx ? logits[i] : mx;
  double sum = 0;
  for (size_t i = 0; i < k; i++) sum += exp((double)(logits[i] - mx));
  size_t best[5];
  size_t top = k < 5 ? k : 5;
  for (size_t t = 0; t < top; t++) {
    size_t b = (size_t)-1;
    for (size_t i = 0; i < k; i++) {
      int taken = 0;
      for (size_t u = 0; u < t; u++) taken |= best[u] == i;
      if (!taken && (b == (size_t)-1 || logits[i] > logits[b])) b = i;
    }
    best[t] = b;
  }
  printf("top-%zu:\n", top);
  for (size_t t = 0; t < top; t++)
    printf("  %zu: class %zu  p=%.6f\n", t + 1, best[t], exp((double)(logits[best[t]] - mx)) / sum);
  printf("latency: %.3f ms (median of %d runs)\n", median, runs);
  rc = 0;

done:
  edgehal_buffer_release(out);
  edgehal_buffer_release(in);
  free(x);
  free(rgb);
  edgehal_session_release(s);
  edgehal_model_release(model);
  edgehal_runtime_release(rt);
  return rc;
}
