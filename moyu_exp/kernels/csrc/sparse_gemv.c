/* Batch-1 decode kernels for gated-MLP decoder blocks on the CPU, called through ctypes.
 *
 * Mat-vecs (weights fp32, or bf16 bit patterns in *_bf16; activations and sums fp32):
 *   dot:         out[r] = W[row(r)] . x, row(r) = idx[r] (output-sparse) or r (dense)
 *   dot_masked:  out[r] = mask[r] ? W[r] . x : 0       (output-sparse by a mask)
 *   axpy_masked: out = sum over i with mask[i] of x[i] * Wt[i]   (input-sparse: reads only
 *                the rows of W^T whose input is kept); returns the number of kept inputs
 * Selection by a rule a strategy states (kernel mode's fast path; see Strategy.kernel_rule):
 *   select_entries: the entries whose score |x_i| * scale_i is at least a threshold (a number or
 *                   one per entry), or the k best scores; returns their sorted indices
 *   axpy_rule, gated_rule: selection fused with the input-sparse mat-vec, and with the whole
 *                   gated MLP (act = silu(gate) selected, kept up rows and down columns read)
 *   mask_rows:      simulated mode's masking of a whole batch by the same rule, in one pass
 * Helpers that keep a decode step to a few calls: rmsnorm, silu_mul, attend (RoPE, KV-cache
 * write and single-query grouped attention).
 *
 * Rows are split over OpenMP threads (torch's runtime, so torch.set_num_threads applies) when
 * the work is large enough to pay for a parallel region; each thread reads whole rows,
 * input-sparse threads sum into private accumulators (caller-provided scratch) added at the
 * end (with few kept rows the threads split the columns instead), and gathered rows are
 * prefetched a few rows ahead. Inner loops are left to the
 * compiler's vectoriser (-O3 -march=native).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define PARALLEL_WORK 8192 /* weight elements below which one thread is faster */

static inline float from_bf16(uint16_t h) {
  uint32_t u = ((uint32_t)h) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static inline float from_f32(float v) { return v; }

/* The first HEAD_LINES cache lines of a gathered row (into L1): a gathered row starts a new
 * stream, and the hardware prefetcher needs a few of its lines before it takes over. Measured
 * here, prefetching whole rows in software stalled the gathers instead. */
#define HEAD_LINES 4
static inline void prefetch_head(const void *row) {
  for (int h = 0; h < HEAD_LINES; h++) __builtin_prefetch((const char *)row + 64 * h, 0, 3);
}

/* row . x for one row of T (each element converted to float by LOAD), vectorised */
#define ROW_DOT(NAME, T, LOAD)                                                           \
  static inline float NAME(const T *row, const float *x, int64_t cols) {                 \
    float acc = 0.f;                                                                     \
    _Pragma("omp simd reduction(+ : acc)") for (int64_t c = 0; c < cols; c++)            \
        acc += LOAD(row[c]) * x[c];                                                      \
    return acc;                                                                          \
  }
ROW_DOT(row_dot_f32, float, from_f32)
ROW_DOT(row_dot_bf16, uint16_t, from_bf16)

/* out[r] = W[row(r)] . x. Contiguous rows (dense): one row at a time, one stream per thread.
 * Gathered rows (idx): four at a time with 16-lane partial sums (four streams for the hardware
 * prefetcher), the first lines of each prefetched DOT_AHEAD rows ahead. On SmolLM2's weights
 * (benchmarks/kernel_bandwidth.py, 10-70% density) this reached 0.42-0.94 of the dense
 * mat-vec's bandwidth, where one gathered row at a time with whole rows prefetched reached
 * 0.35-0.73. */
#define DOT_AHEAD 16
#define DOT(NAME, T, LOAD, ROW_DOT_FN)                                                   \
  void NAME(const T *W, int64_t cols, const int64_t *idx, int64_t k, const float *x,    \
            float *out) {                                                                \
    _Pragma("omp parallel if (k * cols > PARALLEL_WORK)") {                              \
      int t = omp_get_thread_num(), n = omp_get_num_threads();                           \
      int64_t lo = k * t / n, hi = k * (t + 1) / n, body = cols / 16 * 16, r = lo;       \
      if (!idx) {                                                                        \
        for (; r < hi; r++) out[r] = ROW_DOT_FN(W + r * cols, x, cols);                  \
      } else {                                                                           \
        for (int64_t q = lo; q < hi && q < lo + DOT_AHEAD; q++) prefetch_head(W + idx[q] * cols); \
        for (; r + 4 <= hi; r += 4) {                                                    \
          for (int64_t q = r + DOT_AHEAD; q < r + DOT_AHEAD + 4 && q < hi; q++)          \
            prefetch_head(W + idx[q] * cols);                                            \
          const T *p0 = W + idx[r] * cols, *p1 = W + idx[r + 1] * cols;                  \
          const T *p2 = W + idx[r + 2] * cols, *p3 = W + idx[r + 3] * cols;              \
          float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};                  \
          for (int64_t c = 0; c < body; c += 16) {                                       \
            _Pragma("omp simd") for (int i = 0; i < 16; i++) {                           \
              float xv = x[c + i];                                                       \
              a0[i] += LOAD(p0[c + i]) * xv;                                             \
              a1[i] += LOAD(p1[c + i]) * xv;                                             \
              a2[i] += LOAD(p2[c + i]) * xv;                                             \
              a3[i] += LOAD(p3[c + i]) * xv;                                             \
            }                                                                            \
          }                                                                              \
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                  \
          for (int i = 0; i < 16; i++) s0 += a0[i], s1 += a1[i], s2 += a2[i], s3 += a3[i]; \
          for (int64_t c = body; c < cols; c++) {                                        \
            s0 += LOAD(p0[c]) * x[c], s1 += LOAD(p1[c]) * x[c];                          \
            s2 += LOAD(p2[c]) * x[c], s3 += LOAD(p3[c]) * x[c];                          \
          }                                                                              \
          out[r] = s0, out[r + 1] = s1, out[r + 2] = s2, out[r + 3] = s3;                \
        }                                                                                \
        for (; r < hi; r++) out[r] = ROW_DOT_FN(W + idx[r] * cols, x, cols);             \
      }                                                                                  \
    }                                                                                    \
  }

/* out[r] = mask[r] ? W[r] . x : 0: the kept rows listed (into list: rows int64 of scratch,
 * as axpy_masked's), read by the gathered DOT (four at a time) into out's head, then moved to
 * their places from the last down (the r-th kept row's index is at least r, so no value is
 * overwritten before it moves). */
#define DOT_MASKED(NAME, T, DOT_FN)                                                      \
  void NAME(const T *W, int64_t cols, const uint8_t *mask, int64_t rows, const float *x, \
            float *out, int64_t *list) {                                                 \
    int64_t kept = 0;                                                                    \
    for (int64_t r = 0; r < rows; r++)                                                   \
      if (mask[r]) list[kept++] = r;                                                     \
    DOT_FN(W, cols, list, kept, x, out);                                                 \
    for (int64_t r = rows - 1; r >= 0; r--) out[r] = mask[r] ? out[--kept] : 0.f;        \
  }

/* rows listed in `list` (kept of them) of W^T, scaled by x[list[r]], summed into out.
 * Many kept rows: the threads split the rows and sum their accumulators at the end. Few kept
 * rows (COLUMN_SPLIT_KEPT or fewer): the threads split the columns instead and need neither
 * accumulators nor a reduction, which measured here 10-30% faster at 10% density and slower
 * at full density (SmolLM2's shapes, 2 threads).
 * Eight rows are summed per pass (eight streams for the hardware prefetcher), and only the
 * first lines of the rows two passes ahead are prefetched (prefetch_head). Measured with
 * benchmarks/kernel_bandwidth.py (SmolLM2's weights, 2 threads, each pass from DRAM): at 50-70%
 * density 0.81-0.96 of the dense mat-vec's bandwidth, where four rows with whole rows
 * prefetched one group ahead reached 0.64-0.86; at 10%, 0.42-0.79 (before: 0.40-0.57), a
 * short gather being bound by DRAM latency rather than bandwidth. */
#define COLUMN_SPLIT_KEPT 192
#define GROUP 8
#define AXPY_LIST(NAME, T, LOAD)                                                         \
  void NAME(const T *Wt, int64_t cols, const int64_t *list, int64_t kept, const float *x, \
            float *out, float *acc) {                                                    \
    int64_t stride = (cols + 15) / 16 * 16;                                              \
    int by_columns = kept <= COLUMN_SPLIT_KEPT;                                          \
    _Pragma("omp parallel if (kept * cols > PARALLEL_WORK)") {                            \
      int t = omp_get_thread_num(), n = omp_get_num_threads();                           \
      int64_t c0 = 0, w = cols, lo = kept * t / n, hi = kept * (t + 1) / n, r;           \
      float *a = acc + t * stride;                                                       \
      if (by_columns) {                                                                  \
        c0 = cols * t / n / 16 * 16;                                                     \
        w = (t == n - 1 ? cols : cols * (t + 1) / n / 16 * 16) - c0;                     \
        a = out + c0, lo = 0, hi = kept;                                                 \
      }                                                                                  \
      memset(a, 0, sizeof(float) * w);                                                   \
      for (r = lo; r < hi && r < lo + 2 * GROUP; r++) prefetch_head(Wt + list[r] * cols + c0); \
      for (r = lo; r + GROUP <= hi; r += GROUP) {                                        \
        for (int j = 2 * GROUP; j < 3 * GROUP && r + j < hi; j++)                        \
          prefetch_head(Wt + list[r + j] * cols + c0);                                   \
        const T *p[GROUP];                                                               \
        float s[GROUP];                                                                  \
        for (int j = 0; j < GROUP; j++) {                                                \
          p[j] = Wt + list[r + j] * cols + c0;                                           \
          s[j] = x[list[r + j]];                                                         \
        }                                                                                \
        _Pragma("omp simd") for (int64_t c = 0; c < w; c++) a[c] +=                     \
            s[0] * LOAD(p[0][c]) + s[1] * LOAD(p[1][c]) + s[2] * LOAD(p[2][c]) +         \
            s[3] * LOAD(p[3][c]) + s[4] * LOAD(p[4][c]) + s[5] * LOAD(p[5][c]) +         \
            s[6] * LOAD(p[6][c]) + s[7] * LOAD(p[7][c]);                                 \
      }                                                                                  \
      for (; r < hi; r++) {                                                              \
        const T *row = Wt + list[r] * cols + c0;                                         \
        float s = x[list[r]];                                                            \
        _Pragma("omp simd") for (int64_t c = 0; c < w; c++) a[c] += s * LOAD(row[c]);   \
      }                                                                                  \
      if (!by_columns) {                                                                 \
        _Pragma("omp barrier") _Pragma("omp for") for (int64_t c = 0; c < cols; c++) {  \
          float s = 0.f;                                                                 \
          for (int j = 0; j < n; j++) s += acc[j * stride + c];                          \
          out[c] = s;                                                                    \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
  }

/* out = W x over the entries of x that mask keeps, reading those rows of W^T. scratch:
 * (threads + 1) * stride floats for accumulators (stride = cols rounded up to 16) and rows
 * int64 for the kept list. */
#define AXPY_MASKED(NAME, T, LIST_FN)                                                    \
  int64_t NAME(const T *Wt, int64_t cols, const uint8_t *mask, int64_t rows,             \
               const float *x, float *out, float *acc, int64_t *list) {                  \
    int64_t kept = 0;                                                                    \
    for (int64_t i = 0; i < rows; i++)                                                   \
      if (mask[i]) list[kept++] = i;                                                     \
    LIST_FN(Wt, cols, list, kept, x, out, acc);                                          \
    return kept;                                                                         \
  }

static inline float entry_score(const float *x, const float *scale, int64_t i) {
  return fabsf(x[i]) * (scale ? scale[i] : 1.f);
}

/* The cut of a top-k of the scores |x_i| * scale_i, by radix select on their bits (a
 * non-negative float's bits, read as an unsigned integer, order like the float): a histogram of
 * the top 11 bits over every key finds the bin of the k-th largest; its few candidates are
 * copied out and narrowed by the next 11 and 10 bits, stopping once every candidate left is
 * kept. The kept set is then {key > *cut} plus, when *ties >= 0, the first *ties keys equal to
 * *cut (lowest index first), else {key >= *cut}. Scratch: keys and cand (n uint32 each), hist
 * (2048 int32). Requires 0 < k < n. */
static void topk_cut_keys(const uint32_t *keys, int64_t n, int64_t k, uint32_t *cand,
                          int32_t *hist, uint32_t *cut, int64_t *ties) {
  static const int shift[3] = {21, 10, 0}, width[3] = {11, 11, 10};
  uint32_t top = 0;
  for (int64_t i = 0; i < n; i++) top = keys[i] > top ? keys[i] : top;
  const uint32_t *src = keys;
  int64_t count = n, want = k; /* want: rank of the k-th largest among the candidates */
  uint32_t prefix = 0;
  for (int pass = 0; pass < 3; pass++) {
    int bins = 1 << width[pass];
    uint32_t digit = (uint32_t)(bins - 1);
    memset(hist, 0, sizeof(int32_t) * bins);
    for (int64_t i = 0; i < count; i++) hist[(src[i] >> shift[pass]) & digit]++;
    int b = pass == 0 ? (int)(top >> shift[0]) : bins - 1;
    while (hist[b] < want) want -= hist[b--];
    prefix |= (uint32_t)b << shift[pass];
    if (hist[b] == want) { /* every candidate in this bin is kept: no ties to break */
      *cut = prefix;
      *ties = -1;
      return;
    }
    int64_t next = 0; /* the candidates in bin b */
    for (int64_t i = 0; i < count; i++)
      if (((src[i] >> shift[pass]) & digit) == (uint32_t)b) cand[next++] = src[i];
    src = cand; /* compacting in place: next <= i at every step */
    count = next;
  }
  *cut = prefix; /* the exact k-th largest key; keep `want` of its ties */
  *ties = want;
}

static void topk_cut(const float *x, int64_t n, const float *scale, int64_t k, uint32_t *keys,
                     uint32_t *cand, int32_t *hist, uint32_t *cut, int64_t *ties) {
  for (int64_t i = 0; i < n; i++) {
    float s = entry_score(x, scale, i);
    memcpy(keys + i, &s, sizeof s);
  }
  topk_cut_keys(keys, n, k, cand, hist, cut, ties);
}

/* Indices (ascending) of the k largest values of x, signed (a predictor's logits; ties: the
 * lower index). A float's bits ordered as an unsigned integer: negatives flipped whole,
 * non-negatives with the sign bit set. work: 2 n + 2048 floats. Returns the count. */
static int64_t select_top_signed(const float *x, int64_t n, int64_t k, float *work,
                                 int64_t *list) {
  if (k >= n) {
    for (int64_t i = 0; i < n; i++) list[i] = i;
    return n;
  }
  if (k <= 0) return 0;
  uint32_t *keys = (uint32_t *)work, cut;
  int64_t ties, kept = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, x + i, sizeof u);
    keys[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  topk_cut_keys(keys, n, k, keys + n, (int32_t *)(work + 2 * n), &cut, &ties);
  for (int64_t i = 0; i < n; i++)
    if (keys[i] > cut || (keys[i] == cut && (ties < 0 || ties-- > 0))) list[kept++] = i;
  return kept;
}

/* Indices (ascending) of the kept entries of x: score_i = |x_i| * (scale ? scale_i : 1);
 * with k >= 0 the k best scores (ties broken by lower index), else score_i >= threshold_i
 * (thresholds[i], or threshold for all). work: 2 n + 2048 floats of scratch. Returns the
 * count. */
int64_t select_entries(const float *x, int64_t n, const float *scale, const float *thresholds,
                       float threshold, int64_t k, float *work, int64_t *list) {
  int64_t kept = 0;
  if (k >= 0) {
    if (k >= n) {
      for (int64_t i = 0; i < n; i++) list[i] = i;
      return n;
    }
    if (k == 0) return 0;
    uint32_t *keys = (uint32_t *)work, cut;
    int64_t ties;
    topk_cut(x, n, scale, k, keys, keys + n, (int32_t *)(work + 2 * n), &cut, &ties);
    if (ties < 0) {
      for (int64_t i = 0; i < n; i++)
        if (keys[i] >= cut) list[kept++] = i;
    } else {
      for (int64_t i = 0; i < n; i++)
        if (keys[i] > cut || (keys[i] == cut && ties-- > 0)) list[kept++] = i;
    }
    return kept;
  }
  for (int64_t i = 0; i < n; i++) {
    float s = entry_score(x, scale, i);
    if (s >= (thresholds ? thresholds[i] : threshold)) list[kept++] = i;
  }
  return kept;
}

/* Simulated mode's masking of a batch (one call per site and forward, instead of a top-k, a
 * scatter, a fill and a count in separate passes): every row r of x (rows x d, fp32) that is
 * active (active[r], or every row when active is NULL) keeps the entries select_entries keeps
 * and is zeroed elsewhere; an inactive row is copied unchanged. y must not alias x. scratch:
 * `threads` rows of 2 d + 2048 floats (work). Returns the entries dropped over the active rows
 * (the same count kernel mode makes: d - kept per row). */
int64_t mask_rows(const float *x, float *y, int64_t rows, int64_t d, const uint8_t *active,
                  const float *scale, const float *thresholds, float threshold, int64_t k,
                  int64_t threads, float *work) {
  int64_t dropped = 0;
#pragma omp parallel for schedule(static) reduction(+ : dropped) num_threads(threads) \
    if (rows * d > PARALLEL_WORK)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    if (active && !active[r]) {
      memcpy(yr, xr, sizeof(float) * d);
      continue;
    }
    int64_t kept = 0;
    if (k < 0) { /* a threshold: one pass */
      for (int64_t i = 0; i < d; i++) {
        int keep = entry_score(xr, scale, i) >= (thresholds ? thresholds[i] : threshold);
        yr[i] = keep ? xr[i] : 0.f;
        kept += keep;
      }
    } else if (k >= d) {
      memcpy(yr, xr, sizeof(float) * d);
      kept = d;
    } else if (k == 0) {
      memset(yr, 0, sizeof(float) * d);
    } else {
      uint32_t *keys = (uint32_t *)(work + omp_get_thread_num() * (2 * d + 2048)), cut;
      int64_t ties;
      topk_cut(xr, d, scale, k, keys, keys + d, (int32_t *)(keys + 2 * d), &cut, &ties);
      if (ties < 0) { /* the common case, vectorised */
        for (int64_t i = 0; i < d; i++) {
          int keep = keys[i] >= cut;
          yr[i] = keep ? xr[i] : 0.f;
          kept += keep;
        }
      } else {
        for (int64_t i = 0; i < d; i++) {
          int keep = keys[i] > cut || (keys[i] == cut && ties-- > 0);
          yr[i] = keep ? xr[i] : 0.f;
          kept += keep;
        }
      }
    }
    dropped += d - kept;
  }
  return dropped;
}

/* A mask a strategy computed, applied to a batch x (batch x tokens x d, fp32) in one pass: at
 * active positions (active[b * tokens + t], or all when NULL) entry i of row (b, t) is kept when
 * keep[b * keep_b + t * keep_t + i] (strides in entries: 0 broadcasts a mask over a dim), else
 * zeroed; inactive rows are copied. Returns the entries dropped at active positions. */
int64_t apply_keep(const float *x, float *y, int64_t batch, int64_t tokens, int64_t d,
                   const uint8_t *keep, int64_t keep_b, int64_t keep_t, const uint8_t *active,
                   int64_t threads) {
  int64_t dropped = 0, rows = batch * tokens;
#pragma omp parallel for schedule(static) reduction(+ : dropped) num_threads(threads) \
    if (rows * d > PARALLEL_WORK)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    if (active && !active[r]) {
      memcpy(yr, xr, sizeof(float) * d);
      continue;
    }
    const uint8_t *m = keep + (r / tokens) * keep_b + (r % tokens) * keep_t;
    int64_t kept = 0;
    for (int64_t i = 0; i < d; i++) {
      yr[i] = m[i] ? xr[i] : 0.f;
      kept += m[i];
    }
    dropped += d - kept;
  }
  return dropped;
}

/* Exactly k entries of every row kept at random (Knuth's selection sampling: entry i is kept
 * with probability (k - kept so far) / (d - i)), rows drawn independently from `seed`
 * (splitmix64 per row, xorshift within it): the random strategy's mask in one pass. */
static inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void random_keep(uint8_t *mask, int64_t rows, int64_t d, int64_t k, uint64_t seed,
                 int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * d > PARALLEL_WORK)
  for (int64_t r = 0; r < rows; r++) {
    uint64_t state = splitmix64(seed ^ splitmix64((uint64_t)r)) | 1;
    int64_t need = k;
    uint8_t *m = mask + r * d;
    for (int64_t i = 0; i < d; i++) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      /* keep with probability need / (d - i), from the top 53 bits */
      double u = (double)(state >> 11) * (1.0 / 9007199254740992.0);
      int keep = u * (double)(d - i) < (double)need;
      m[i] = (uint8_t)keep;
      need -= keep;
    }
  }
}

DOT(dot_f32, float, from_f32, row_dot_f32)
DOT(dot_bf16, uint16_t, from_bf16, row_dot_bf16)
DOT_MASKED(dot_masked_f32, float, dot_f32)
DOT_MASKED(dot_masked_bf16, uint16_t, dot_bf16)
AXPY_LIST(axpy_list_f32, float, from_f32)
AXPY_LIST(axpy_list_bf16, uint16_t, from_bf16)
AXPY_MASKED(axpy_masked_f32, float, axpy_list_f32)
AXPY_MASKED(axpy_masked_bf16, uint16_t, axpy_list_bf16)

/* select entries of x by the rule, then out = W x over them (W^T rows); scratch as above:
 * work (2 * rows + 2048 floats), list (rows int64), acc ((threads + 1) * stride floats) */
#define AXPY_RULE(NAME, T, LIST_FN)                                                      \
  int64_t NAME(const T *Wt, int64_t cols, int64_t rows, const float *x, const float *scale, \
               const float *thresholds, float threshold, int64_t k, float *out, float *work, \
               int64_t *list, float *acc) {                                              \
    int64_t kept = select_entries(x, rows, scale, thresholds, threshold, k, work, list);   \
    LIST_FN(Wt, cols, list, kept, x, out, acc);                                          \
    return kept;                                                                         \
  }
AXPY_RULE(axpy_rule_f32, float, axpy_list_f32)
AXPY_RULE(axpy_rule_bf16, uint16_t, axpy_list_bf16)

/* The gated MLP with the activation site sparse: act = silu(gate) (gate: d_ff values already
 * computed), kept = the rule on act, up = rows kept of W_up . x, z = act * up on kept,
 * out = W_down z reading the kept rows of W_down^T. scratch: work (3 * d_ff + 2048 floats),
 * list (d_ff int64), upv (d_ff floats), acc as above. */
#define GATED_RULE(NAME, T, DOT_FN, LIST_FN)                                             \
  int64_t NAME(const T *W_up, const T *Wt_down, int64_t d, int64_t d_ff, const float *gate, \
               const float *x, const float *scale, const float *thresholds, float threshold, \
               int64_t k, float *out, float *work, int64_t *list, float *upv, float *acc) { \
    float *act = work + 2 * d_ff + 2048; /* after select_entries' scratch */            \
    for (int64_t i = 0; i < d_ff; i++) act[i] = gate[i] / (1.0f + expf(-gate[i]));       \
    int64_t kept = select_entries(act, d_ff, scale, thresholds, threshold, k, work, list); \
    DOT_FN(W_up, d, list, kept, x, upv);                                                 \
    for (int64_t r = 0; r < kept; r++) upv[r] *= act[list[r]];                           \
    /* axpy_list reads x[list[r]]: scatter z back to full length in act */               \
    for (int64_t r = 0; r < kept; r++) act[list[r]] = upv[r];                            \
    LIST_FN(Wt_down, d, list, kept, act, out, acc);                                      \
    return kept;                                                                         \
  }
GATED_RULE(gated_rule_f32, float, dot_f32, axpy_list_f32)
GATED_RULE(gated_rule_bf16, uint16_t, dot_bf16, axpy_list_bf16)

/* out = x / sqrt(mean(x^2) + eps) * w: RMSNorm in fp32 */
void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
  float scale = 1.0f / sqrtf((float)(ss / n) + eps);
  for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * scale);
}

/* out[i] = silu(gu[i]) * gu[n + i] */
void silu_mul(const float *gu, int64_t n, float *out) {
  for (int64_t i = 0; i < n; i++) {
    float g = gu[i];
    out[i] = g / (1.0f + expf(-g)) * gu[n + i];
  }
}

static void rope(float *v, const float *cos, const float *sin, int64_t dim) {
  int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i++) {
    float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* qkv = [q (heads*dim), k (kv*dim), v (kv*dim)] of the token at position pos: RoPE q and k,
 * store k and v in the layer's caches (kv, max_tokens, dim), attend over positions 0..pos and
 * write the heads' outputs (heads*dim) to out. scores: a scratch row of max_tokens floats per
 * thread (heads are split over threads). */
void attend(float *qkv, float *kcache, float *vcache, int64_t heads, int64_t kv, int64_t dim,
            int64_t max_tokens, int64_t pos, const float *cos, const float *sin, float scale,
            float *scores, float *out) {
  float *q = qkv, *k = qkv + heads * dim, *v = qkv + (heads + kv) * dim;
  for (int64_t h = 0; h < heads; h++) rope(q + h * dim, cos, sin, dim);
  for (int64_t g = 0; g < kv; g++) {
    rope(k + g * dim, cos, sin, dim);
    memcpy(kcache + (g * max_tokens + pos) * dim, k + g * dim, sizeof(float) * dim);
    memcpy(vcache + (g * max_tokens + pos) * dim, v + g * dim, sizeof(float) * dim);
  }
  int64_t group = heads / kv;
#pragma omp parallel for schedule(static)
  for (int64_t h = 0; h < heads; h++) {
    float *s = scores + omp_get_thread_num() * max_tokens;
    const float *qh = q + h * dim;
    const float *kh = kcache + (h / group) * max_tokens * dim;
    const float *vh = vcache + (h / group) * max_tokens * dim;
    float top = -INFINITY;
    for (int64_t t = 0; t <= pos; t++) {
      s[t] = row_dot_f32(kh + t * dim, qh, dim) * scale;
      if (s[t] > top) top = s[t];
    }
    float total = 0.f;
    for (int64_t t = 0; t <= pos; t++) {
      s[t] = expf(s[t] - top);
      total += s[t];
    }
    float *o = out + h * dim;
    for (int64_t c = 0; c < dim; c++) o[c] = 0.f;
    for (int64_t t = 0; t <= pos; t++) {
      float p = s[t] / total;
#pragma omp simd
      for (int64_t c = 0; c < dim; c++) o[c] += p * vh[t * dim + c];
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* A whole decode step in one call, for strategies whose kept sets are rules (or a compact   */
/* MLP): no Python between the layers. Layouts mirror moyu_exp/kernels/fused.py.              */

typedef struct {
  const float *scale;      /* per-entry score factor, or NULL */
  const float *thresholds; /* per-entry thresholds, or NULL (then threshold) */
  float threshold;
  int64_t k; /* >= 0: keep the k best scores */
  int64_t active;
  /* the dropped entries' low-rank path (R-Sparse), when rank > 0: out += US (V^T x_dropped),
   * V^T (rank, rows) and US (cols, rank) row-major, in the weights' type */
  const void *lr_vt, *lr_us;
  int64_t rank;
} Rule;

enum {
  ATTN_INPUT, O_PROJ_INPUT, MLP_INPUT, GATE_ACT, MLP_INTERMEDIATE,
  Q_INPUT, K_INPUT, V_INPUT, GATE_INPUT, UP_INPUT, SITES
};

typedef struct {
  const float *ln1, *ln2;
  const void *qkv, *o, *gate_up, *down;   /* (rows, cols) row-major */
  const void *qkv_t, *o_t, *gate_up_t, *down_t; /* transposed copies, or NULL */
  const void *c_gate_up, *c_down;         /* compact MLP (2 kept, d) and (d, kept), or NULL */
  const void *c_gate_up_t;                /* its gate_up transposed (d, 2 kept), or NULL */
  int64_t c_kept;
  float *keys, *values;                   /* (kv, max_tokens, head_dim) */
  Rule rules[SITES];
  const void *proj_t[5]; /* q, k, v, gate, up transposed, for their own sites, or NULL */
  /* R^T (d, d) of the attention's and the MLP's rotated input, or NULL: the sites of that
   * input read x R (their readers' weights are W R); the projections that are not sites read
   * x itself */
  const void *rot_attn, *rot_mlp;
  /* a learned predictor of the MLP's neurons from the block input h, or NULL: its logits
   * W2 (W1 h) (W1 (rank, d), W2 (d_ff, rank)), the k best kept; the MLP then reads the kept
   * neurons' gate and up rows and down^T rows */
  const void *p_w1, *p_w2;
  int64_t p_rank, p_k;
} LayerSpec;

typedef struct {
  int64_t layers, d, d_ff, heads, kv, head_dim, max_tokens, vocab;
  float eps, scale;
  const void *embed, *head; /* (vocab, d) */
  const float *norm, *cos, *sin; /* norm (d); cos/sin (max_tokens, head_dim) */
  const LayerSpec *layer;
  /* scratch, fp32: h, n (d); qkv (d_q + 2 d_kv); attn (d_q); gate_up (2 d_ff); z (d_ff);
   * out (max(d, 2 d_ff)); scores (threads * max_tokens); work (4 max(d, d_ff) + 2048);
   * upv (d_ff); acc ((threads + 1) * stride); list (max(d, d_ff) int64); xr (d);
   * xd (max(d, d_q, d_ff)); lr (largest rank + max(2 d_ff, d_q + 2 d_kv)); pred (d_ff);
   * plist (d_ff int64) */
  float *h, *n, *qkv, *attn, *gu, *z, *out, *scores, *work, *upv, *acc;
  int64_t *list;
  float *xr, *xd, *lr;
  float *pred;    /* a predictor's logits (d_ff) */
  int64_t *plist; /* its kept neurons (d_ff int64) */
} ModelSpec;

/* One input-sparse site: out = the rule's kept entries of x (rows of them) read through the
 * rows of Wt (cols outputs each), plus the dropped entries' low-rank path if the rule has one. */
#define SITE(NAME, T, AXPY_FN, DOT_FN)                                                     \
  static int64_t NAME(const ModelSpec *m, const Rule *R, const T *Wt, int64_t cols,        \
                      int64_t rows, const float *x, float *out) {                          \
    int64_t kept = AXPY_FN(Wt, cols, rows, x, R->scale, R->thresholds, R->threshold, R->k, \
                           out, m->work, m->list, m->acc);                                 \
    if (R->rank > 0) {                                                                     \
      memcpy(m->xd, x, sizeof(float) * rows);                                              \
      for (int64_t r = 0; r < kept; r++) m->xd[m->list[r]] = 0.f;                          \
      DOT_FN((const T *)R->lr_vt, rows, NULL, R->rank, m->xd, m->lr);                      \
      DOT_FN((const T *)R->lr_us, R->rank, NULL, cols, m->lr, m->lr + R->rank);            \
      for (int64_t c = 0; c < cols; c++) out[c] += m->lr[R->rank + c];                     \
    }                                                                                      \
    return kept;                                                                           \
  }
SITE(site_f32, float, axpy_rule_f32, dot_f32)
SITE(site_bf16, uint16_t, axpy_rule_bf16, dot_bf16)

#define STEP(NAME, T, LOAD, DOT_FN, SITE_FN, GATED_FN, LIST_FN)                            \
  void NAME(const ModelSpec *m, int64_t token, int64_t pos, float *logits, int64_t *kept) { \
    int64_t d = m->d, d_ff = m->d_ff, d_q = m->heads * m->head_dim;                        \
    int64_t d_kv = m->kv * m->head_dim, qkv_rows = d_q + 2 * d_kv;                         \
    int64_t offset[5] = {0, d_q, d_q + d_kv, 0, d_ff}, width[5] = {d_q, d_kv, d_kv, d_ff, d_ff}; \
    const T *embed = (const T *)m->embed;                                                  \
    for (int64_t i = 0; i < d; i++) m->h[i] = LOAD(embed[token * d + i]);                  \
    const float *cos = m->cos + pos * m->head_dim, *sin = m->sin + pos * m->head_dim;      \
    for (int64_t l = 0; l < m->layers; l++) {                                              \
      const LayerSpec *L = m->layer + l;                                                   \
      const Rule *R = L->rules;                                                            \
      int64_t *K = kept + l * SITES, predicted = 0;                                        \
      if (L->p_w1) { /* the predictor reads the block input, before the attention */       \
        DOT_FN((const T *)L->p_w1, d, NULL, L->p_rank, m->h, m->lr);                       \
        DOT_FN((const T *)L->p_w2, L->p_rank, NULL, d_ff, m->lr, m->pred);                 \
        predicted = select_top_signed(m->pred, d_ff, L->p_k, m->work, m->plist);           \
      }                                                                                    \
      rmsnorm(m->h, L->ln1, d, m->eps, m->n);                                              \
      const float *x = m->n;                                                               \
      if (L->rot_attn) {                                                                   \
        DOT_FN((const T *)L->rot_attn, d, NULL, d, m->n, m->xr);                           \
        x = m->xr;                                                                         \
      }                                                                                    \
      if (R[ATTN_INPUT].active)                                                            \
        K[ATTN_INPUT] = SITE_FN(m, R + ATTN_INPUT, (const T *)L->qkv_t, qkv_rows, d, x, m->qkv); \
      else if (R[Q_INPUT].active || R[K_INPUT].active || R[V_INPUT].active)                \
        for (int p = 0; p < 3; p++) { /* each projection its own kept inputs */            \
          if (R[Q_INPUT + p].active)                                                       \
            K[Q_INPUT + p] = SITE_FN(m, R + Q_INPUT + p, (const T *)L->proj_t[p], width[p], \
                                     d, x, m->qkv + offset[p]);                            \
          else                                                                             \
            DOT_FN((const T *)L->qkv + offset[p] * d, d, NULL, width[p], m->n,             \
                   m->qkv + offset[p]);                                                    \
        }                                                                                  \
      else                                                                                 \
        DOT_FN((const T *)L->qkv, d, NULL, qkv_rows, m->n, m->qkv);                        \
      attend(m->qkv, L->keys, L->values, m->heads, m->kv, m->head_dim, m->max_tokens, pos, \
             cos, sin, m->scale, m->scores, m->attn);                                      \
      if (R[O_PROJ_INPUT].active)                                                          \
        K[O_PROJ_INPUT] = SITE_FN(m, R + O_PROJ_INPUT, (const T *)L->o_t, d, d_q, m->attn, m->out); \
      else                                                                                 \
        DOT_FN((const T *)L->o, d_q, NULL, d, m->attn, m->out);                            \
      for (int64_t i = 0; i < d; i++) m->h[i] += m->out[i];                                \
      rmsnorm(m->h, L->ln2, d, m->eps, m->n);                                              \
      x = m->n;                                                                            \
      if (L->rot_mlp) {                                                                    \
        DOT_FN((const T *)L->rot_mlp, d, NULL, d, m->n, m->xr);                            \
        x = m->xr;                                                                         \
      }                                                                                    \
      if (L->c_gate_up) {                                                                  \
        if (R[MLP_INPUT].active && L->c_gate_up_t)                                         \
          K[MLP_INPUT] = SITE_FN(m, R + MLP_INPUT, (const T *)L->c_gate_up_t, 2 * L->c_kept, \
                                 d, x, m->gu);                                             \
        else                                                                               \
          DOT_FN((const T *)L->c_gate_up, d, NULL, 2 * L->c_kept, m->n, m->gu);            \
        silu_mul(m->gu, L->c_kept, m->z);                                                  \
        DOT_FN((const T *)L->c_down, L->c_kept, NULL, d, m->z, m->out);                    \
        K[MLP_INTERMEDIATE] = L->c_kept;                                                   \
      } else if (L->p_w1) { /* the predicted neurons: gate and up rows, down^T rows */     \
        DOT_FN((const T *)L->gate_up, d, m->plist, predicted, m->n, m->gu);                \
        DOT_FN((const T *)L->gate_up + d_ff * d, d, m->plist, predicted, m->n, m->upv);    \
        memset(m->z, 0, sizeof(float) * d_ff);                                             \
        for (int64_t r = 0; r < predicted; r++) {                                          \
          float g = m->gu[r];                                                              \
          m->z[m->plist[r]] = g / (1.0f + expf(-g)) * m->upv[r];                           \
        }                                                                                  \
        LIST_FN((const T *)L->down_t, d, m->plist, predicted, m->z, m->out, m->acc);       \
        K[MLP_INTERMEDIATE] = predicted;                                                   \
      } else {                                                                             \
        int64_t gate_rows = R[GATE_ACT].active ? d_ff : 2 * d_ff;                          \
        if (R[MLP_INPUT].active)                                                           \
          K[MLP_INPUT] = SITE_FN(m, R + MLP_INPUT, (const T *)L->gate_up_t, gate_rows, d, x, \
                                 m->gu);                                                   \
        else if (R[GATE_INPUT].active || R[UP_INPUT].active)                               \
          for (int p = 3; p < 5; p++) { /* gate and up: each its own kept inputs */        \
            if (R[GATE_INPUT + p - 3].active)                                              \
              K[GATE_INPUT + p - 3] = SITE_FN(m, R + GATE_INPUT + p - 3,                   \
                                              (const T *)L->proj_t[p], d_ff, d, x,          \
                                              m->gu + offset[p]);                          \
            else                                                                           \
              DOT_FN((const T *)L->gate_up + offset[p] * d, d, NULL, d_ff, m->n,           \
                     m->gu + offset[p]);                                                   \
          }                                                                                \
        else                                                                               \
          DOT_FN((const T *)L->gate_up, d, NULL, gate_rows, m->n, m->gu);                  \
        if (R[GATE_ACT].active) {                                                          \
          K[GATE_ACT] = GATED_FN((const T *)L->gate_up + d_ff * d, (const T *)L->down_t, d, \
                                 d_ff, m->gu, m->n, R[GATE_ACT].scale,                     \
                                 R[GATE_ACT].thresholds, R[GATE_ACT].threshold,            \
                                 R[GATE_ACT].k, m->out, m->work, m->list, m->upv, m->acc); \
        } else {                                                                           \
          silu_mul(m->gu, d_ff, m->z);                                                     \
          if (R[MLP_INTERMEDIATE].active)                                                  \
            K[MLP_INTERMEDIATE] = SITE_FN(m, R + MLP_INTERMEDIATE, (const T *)L->down_t, d, \
                                          d_ff, m->z, m->out);                             \
          else                                                                             \
            DOT_FN((const T *)L->down, d_ff, NULL, d, m->z, m->out);                       \
        }                                                                                  \
      }                                                                                    \
      for (int64_t i = 0; i < d; i++) m->h[i] += m->out[i];                                \
    }                                                                                      \
    rmsnorm(m->h, m->norm, d, m->eps, m->n);                                               \
    DOT_FN((const T *)m->head, d, NULL, m->vocab, m->n, logits);                           \
  }

STEP(decode_step_f32, float, from_f32, dot_f32, site_f32, gated_rule_f32, axpy_list_f32)
STEP(decode_step_bf16, uint16_t, from_bf16, dot_bf16, site_bf16, gated_rule_bf16, axpy_list_bf16)
