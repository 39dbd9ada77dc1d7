/* CPU kernels of the TopK/BatchTopK training step (sae_core/cpu_kernels.py builds and loads them).
 *
 * Row-wise top-k of a float32 matrix, for the TopK encoder.
 * torch.topk spends ~1.3 us per 1024-wide row (a partial sort of (value, index) pairs), about as
 * long as the encoder matmul itself. Here a row costs three cheap steps:
 *   1. lane maxima: the maximum of every lane j mod L (L a power of two >= 2k), vectorised;
 *   2. a lower bound t for the row's k-th largest value: the k-th largest lane maximum (k different
 *      elements are >= it), found by branch-free rank counting;
 *   3. a vectorised scan that collects the few elements >= t (every top-k element is one of them),
 *      then an exact selection among those candidates.
 * Ties are broken by the lower index; the indices of a row come out in ascending order.
 * A row with fewer than k comparable (non-NaN) values is reported, and the caller falls back to
 * torch.topk so NaN handling stays torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Measured on a 2-vCPU EPYC (bench/topk_kernel.py): 2-5x faster than torch.topk for k <= 64 at every
 * width tried (32 to 65536), slower from k = 128 on, so larger k is left to torch.topk. */
#define MAX_K 64
#define MAX_LANES 128  /* lanes: the smallest power of two >= 2k, at least 16 (2k was fastest) */
#define RANK_MAX 128   /* candidates beyond this are selected with a heap instead of rank counting */

/* ---- pass 1 and 2: a lower bound for the k-th largest value of a row ---- */

static int64_t lanes_for(int64_t k) {
    int64_t lanes = 16;
    while (lanes < 2 * k) lanes *= 2;
    return lanes;
}

/* The k largest of buf[0..count) (an earlier position wins a tie), in position order, by counting for
 * each value the values that beat it: no data-dependent branches, and the inner loop vectorises.
 * vals/idx need room for count entries (a loser is written and then overwritten). */
static void select_by_rank(const float *buf, const int64_t *ibuf, int64_t count, int64_t k, float *vals,
                           int64_t *idx) {
    int64_t out = 0;
    for (int64_t i = 0; i < count; i++) {
        int32_t beaten_by = 0;
        float x = buf[i];
        for (int64_t j = 0; j < count; j++) beaten_by += (buf[j] > x) | ((buf[j] == x) & (j < i));
        vals[out] = x;
        idx[out] = ibuf[i];
        out += beaten_by < k;
    }
}

/* Lane maxima in blocks of 16 lanes: a fixed-width inner loop the compiler turns into one vector max. */
static void lane_maxima(const float *row, int64_t n, int64_t lanes, float *m) {
    for (int64_t base = 0; base < lanes; base += 16) {
        float acc[16];
        for (int q = 0; q < 16; q++) acc[q] = -INFINITY;
        for (int64_t j = base; j + 16 <= n - n % lanes; j += lanes)
            for (int q = 0; q < 16; q++) {
                float x = row[j + q];
                acc[q] = x > acc[q] ? x : acc[q]; /* a NaN never wins */
            }
        for (int q = 0; q < 16; q++) m[base + q] = acc[q];
    }
}

static float kth_largest_lower_bound(const float *row, int64_t n, int64_t k) {
    int64_t lanes = lanes_for(k);
    if (n < lanes) return -INFINITY;
    float m[MAX_LANES], top[MAX_LANES];
    int64_t lane[MAX_LANES], positions[MAX_LANES];
    lane_maxima(row, n, lanes, m);
    for (int64_t q = 0; q < lanes; q++) positions[q] = q;
    select_by_rank(m, positions, lanes, k, top, lane);
    float t = top[0];
    for (int64_t i = 1; i < k; i++) t = top[i] < t ? top[i] : t;
    return t;
}

/* ---- pass 3: the candidates >= t, in index order ---- */

static void append(float x, int64_t j, float *buf, int64_t *ibuf, int64_t *count) {
    buf[*count] = x;
    ibuf[*count] = j;
    (*count)++;
}

#if defined(__AVX512F__) || defined(__AVX2__)
/* Append row[j + q] for every set bit q of mask (a vector comparison's result). */
static void append_marked(const float *row, int64_t j, unsigned mask, float *buf, int64_t *ibuf, int64_t *count) {
    for (; mask; mask &= mask - 1) {
        int q = __builtin_ctz(mask);
        append(row[j + q], j + q, buf, ibuf, count);
    }
}
#endif

static int64_t collect(const float *row, int64_t n, float t, float *buf, int64_t *ibuf) {
    int64_t count = 0, j = 0;
#if defined(__AVX512F__)
    __m512 tv = _mm512_set1_ps(t);
    for (; j + 16 <= n; j += 16)
        append_marked(row, j, _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), tv, _CMP_GE_OQ), buf, ibuf, &count);
#elif defined(__AVX2__)
    __m256 tv = _mm256_set1_ps(t);
    for (; j + 8 <= n; j += 8) {
        unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), tv, _CMP_GE_OQ));
        append_marked(row, j, mask, buf, ibuf, &count);
    }
#endif
    for (; j < n; j++)
        if (row[j] >= t) append(row[j], j, buf, ibuf, &count);
    return count;
}

/* ---- pass 3b: exact top-k among the candidates ---- */

/* beats(a, b): a ranks above b (larger value, or equal value at a lower position). */
static int beats(float va, int64_t ia, float vb, int64_t ib) { return va > vb || (va == vb && ia < ib); }

static void swap_entries(float *hv, int64_t *hi, int64_t a, int64_t b) {
    float tv = hv[a];
    hv[a] = hv[b];
    hv[b] = tv;
    int64_t ti = hi[a];
    hi[a] = hi[b];
    hi[b] = ti;
}

static void sift_down(float *hv, int64_t *hi, int64_t k) {
    for (int64_t pos = 0;;) {
        int64_t low = pos, left = 2 * pos + 1, right = left + 1;
        if (left < k && beats(hv[low], hi[low], hv[left], hi[left])) low = left;
        if (right < k && beats(hv[low], hi[low], hv[right], hi[right])) low = right;
        if (low == pos) return;
        swap_entries(hv, hi, pos, low);
        pos = low;
    }
}

/* Many candidates (adversarial rows, e.g. many equal values): a min-heap of the best k so far, then
 * the k winners put back in index order. */
static void select_by_heap(const float *buf, const int64_t *ibuf, int64_t count, int64_t k, float *vals,
                           int64_t *idx, unsigned char *chosen) {
    float hv[MAX_K];
    int64_t hi[MAX_K];
    for (int64_t i = 0; i < k; i++) {
        hv[i] = buf[i];
        hi[i] = i;
    }
    /* worst first: a sorted array is a valid min-heap */
    for (int64_t i = 1; i < k; i++)
        for (int64_t j = i; j > 0 && beats(hv[j - 1], hi[j - 1], hv[j], hi[j]); j--) swap_entries(hv, hi, j, j - 1);
    for (int64_t i = k; i < count; i++)
        if (beats(buf[i], i, hv[0], hi[0])) {
            hv[0] = buf[i];
            hi[0] = i;
            sift_down(hv, hi, k);
        }
    for (int64_t i = 0; i < count; i++) chosen[i] = 0;
    for (int64_t i = 0; i < k; i++) chosen[hi[i]] = 1;
    int64_t out = 0;
    for (int64_t i = 0; i < count; i++)
        if (chosen[i]) {
            vals[out] = buf[i];
            idx[out] = ibuf[i];
            out++;
        }
}

/* ---- threads ---- */

/* fn(ctx, lo, hi) over [0, n) split into contiguous ranges, one per thread. OpenMP rather than our own
 * threads: loaded into a torch process, this library shares torch's OpenMP runtime and its worker threads
 * (fresh pthreads competed with torch's still-spinning workers and made every kernel slower in training).
 * Results never depend on the number of threads: every output element is written by one range. */
typedef void (*RangeFn)(void *ctx, int64_t lo, int64_t hi);

static void parallel_for(int64_t n, int64_t threads, RangeFn fn, void *ctx) {
#ifdef _OPENMP
    if (threads > n) threads = n;
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
            int64_t lo = n * t / count, hi = n * (t + 1) / count;
            if (hi > lo) fn(ctx, lo, hi);
        }
        return;
    }
#else
    (void)threads;
#endif
    if (n > 0) fn(ctx, 0, n);
}

/* ---- top-k: one row, a range of rows ---- */

typedef struct { /* per-thread buffers, n entries each */
    float *values, *selected;
    int64_t *positions, *selected_positions;
    unsigned char *chosen;
} Scratch;

static int row_topk(const float *row, int64_t n, int64_t k, float *vals, int64_t *idx, Scratch *s) {
    float t = kth_largest_lower_bound(row, n, k);
    int64_t count = collect(row, n, t, s->values, s->positions);
    if (count < k) return 1; /* NaNs: fewer than k comparable values */
    if (count <= RANK_MAX) {
        select_by_rank(s->values, s->positions, count, k, s->selected, s->selected_positions);
        memcpy(vals, s->selected, k * sizeof(float));
        memcpy(idx, s->selected_positions, k * sizeof(int64_t));
    } else {
        select_by_heap(s->values, s->positions, count, k, vals, idx, s->chosen);
    }
    return 0;
}

typedef struct {
    const float *pre;
    int64_t n, k;
    float *vals;
    int64_t *idx;
    int64_t incomplete; /* rows not completed, summed atomically over the ranges */
} TopkTask;

static void topk_range(void *arg, int64_t lo, int64_t hi) {
    TopkTask *task = arg;
    int64_t n = task->n, k = task->k, incomplete = 0;
    Scratch s = {malloc(n * sizeof(float)), malloc(n * sizeof(float)), malloc(n * sizeof(int64_t)),
                 malloc(n * sizeof(int64_t)), malloc(n)};
    if (!s.values || !s.selected || !s.positions || !s.selected_positions || !s.chosen)
        incomplete = hi - lo;
    else
        for (int64_t r = lo; r < hi; r++)
            incomplete += row_topk(task->pre + r * n, n, k, task->vals + r * k, task->idx + r * k, &s);
    free(s.values);
    free(s.selected);
    free(s.positions);
    free(s.selected_positions);
    free(s.chosen);
    __atomic_fetch_add(&task->incomplete, incomplete, __ATOMIC_RELAXED);
}

/* pre: [rows, n] row-major. Writes vals/idx [rows, k]; returns the number of rows it could not
 * complete (NaNs), or -1 for arguments it does not take. */
int64_t topk_rows_f32(const float *pre, int64_t rows, int64_t n, int64_t k, float *vals, int64_t *idx,
                      int64_t threads) {
    if (k < 1 || k > MAX_K || k > n) return -1;
    TopkTask task = {pre, n, k, vals, idx, 0};
    parallel_for(rows, threads, topk_range, &task);
    return task.incomplete;
}

/* ---- the (row, latent) pairs of a top-k result grouped by latent (LatentLayout on the CPU) ---- */

/* idx: [count] latents in [0, d_sae) of the selected (row, latent) pairs; the batch row of pair i is
 * pair_rows[i], or i / k when pair_rows is NULL (a flattened [rows, k] top-k). Writes a stable counting
 * sort by latent: order[count] (positions into idx), rows[count] (the batch row of each sorted pair),
 * crow[d_sae + 1] (CSR row starts). O(count + d_sae) instead of a comparison sort. Returns 0, or -1 if a
 * latent is out of range. */
int64_t latent_layout_i64(const int64_t *idx, int64_t count, int64_t k, const int64_t *pair_rows, int64_t d_sae,
                          int64_t *order, int64_t *rows, int64_t *crow) {
    for (int64_t i = 0; i <= d_sae; i++) crow[i] = 0;
    for (int64_t i = 0; i < count; i++) {
        if (idx[i] < 0 || idx[i] >= d_sae) return -1;
        crow[idx[i] + 1]++;
    }
    for (int64_t i = 0; i < d_sae; i++) crow[i + 1] += crow[i];
    int64_t *next = malloc((d_sae + 1) * sizeof(int64_t)); /* next free slot of each latent */
    if (!next) return -1;
    memcpy(next, crow, (d_sae + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < count; i++) {
        int64_t slot = next[idx[i]]++;
        order[slot] = i;
        rows[slot] = pair_rows ? pair_rows[i] : i / k;
    }
    free(next);
    return 0;
}

/* ---- products that touch only the selected (row, latent) pairs ---- */

typedef struct {
    const int64_t *crow, *rows, *order;
    const float *values, *dense;
    int64_t d;
    float *out;
} WeightGradTask;

static void weight_grad_range(void *arg, int64_t lo, int64_t hi) {
    WeightGradTask *t = arg;
    for (int64_t latent = lo; latent < hi; latent++) {
        float *dst = t->out + latent * t->d;
        for (int64_t c = 0; c < t->d; c++) dst[c] = 0.0f;
        for (int64_t p = t->crow[latent]; p < t->crow[latent + 1]; p++) {
            const float *src = t->dense + t->rows[p] * t->d;
            float v = t->values[t->order[p]];
            for (int64_t c = 0; c < t->d; c++) dst[c] += v * src[c];
        }
    }
}

/* out[latent] = sum over the pairs p of that latent (crow/rows/order from latent_layout_i64) of
 * values[order[p]] * dense[rows[p]]: the weight gradient [d_sae, d] of a top-k layer, pairs summed in
 * batch order. Latents are split across threads. */
void weight_grad_f32(const int64_t *crow, const int64_t *rows, const int64_t *order, const float *values,
                     const float *dense, int64_t d_sae, int64_t d, float *out, int64_t threads) {
    WeightGradTask task = {crow, rows, order, values, dense, d, out};
    parallel_for(d_sae, threads, weight_grad_range, &task);
}

typedef struct {
    const float *W, *g;
    const int64_t *idx, *pair_rows;
    int64_t W_rows, k, d;
    float *out;
    int64_t out_of_range;
} RowDotsTask;

static void row_dots_range(void *arg, int64_t lo, int64_t hi) {
    RowDotsTask *t = arg;
    for (int64_t p = lo; p < hi; p++) {
        int64_t latent = t->idx[p];
        if (latent < 0 || latent >= t->W_rows) {
            __atomic_store_n(&t->out_of_range, 1, __ATOMIC_RELAXED);
            continue;
        }
        const float *w = t->W + latent * t->d;
        const float *g = t->g + (t->pair_rows ? t->pair_rows[p] : p / t->k) * t->d;
        float part[16] = {0}; /* 16 partial sums: one vector register, and a fixed summation order */
        int64_t c = 0;
        for (; c + 16 <= t->d; c += 16)
            for (int q = 0; q < 16; q++) part[q] += w[c + q] * g[c + q];
        float acc = 0.0f;
        for (int q = 0; q < 16; q++) acc += part[q];
        for (; c < t->d; c++) acc += w[c] * g[c];
        t->out[p] = acc;
    }
}

/* out[p] = W[idx[p]] . g[row of p] for W [W_rows, d], g [*, d] and `count` selected pairs, the row of
 * pair p being pair_rows[p], or p / k when pair_rows is NULL (a flattened [rows, k] top-k): the decoder's
 * gradient with respect to the selected activations. Pairs are split across threads. Returns 0, or -1
 * if an index is outside W. */
int64_t row_dots_f32(const float *W, int64_t W_rows, const int64_t *idx, const float *g, int64_t count, int64_t k,
                     const int64_t *pair_rows, int64_t d, float *out, int64_t threads) {
    RowDotsTask task = {W, g, idx, pair_rows, W_rows, k, d, out, 0};
    parallel_for(count, threads, row_dots_range, &task);
    return task.out_of_range ? -1 : 0;
}

/* ---- BatchTopK: the entries of a row that may be selected (positive and >= t) ---- */

/* x >= positive_floor(t) <=> x >= t and x > 0 (the smallest subnormal is the least positive float). */
static float positive_floor(float t) { return t > 0.0f ? t : 1.40129846e-45f; }

typedef struct {
    const float *pre;
    int64_t n;
    float t;
    int64_t *counts;
} CountTask;

static void count_range(void *arg, int64_t lo, int64_t hi) {
    CountTask *task = arg;
    for (int64_t r = lo; r < hi; r++) {
        const float *row = task->pre + r * task->n;
        int32_t count = 0;
        for (int64_t j = 0; j < task->n; j++) count += row[j] >= task->t;
        task->counts[r] = count;
    }
}

/* counts[r] = #{j : pre[r, j] >= t and pre[r, j] > 0} for pre [rows, n]. (torch reduces a bool tensor
 * about ten times slower.) */
void count_positive_at_least_f32(const float *pre, int64_t rows, int64_t n, float t, int64_t *counts, int64_t threads) {
    CountTask task = {pre, n, positive_floor(t), counts};
    parallel_for(rows, threads, count_range, &task);
}

typedef struct {
    const float *pre;
    const int64_t *starts;
    int64_t n;
    float t;
    float *vals;
    int64_t *idx, *pair_rows;
    int64_t mismatch;
} CollectTask;

static void collect_range(void *arg, int64_t lo, int64_t hi) {
    CollectTask *task = arg;
    for (int64_t r = lo; r < hi; r++) {
        int64_t start = task->starts[r], room = task->starts[r + 1] - start;
        /* collect() writes at most n entries; the row's room was counted with the same test */
        int64_t count = collect(task->pre + r * task->n, task->n, task->t, task->vals + start, task->idx + start);
        for (int64_t j = 0; j < count && j < room; j++) task->pair_rows[start + j] = r;
        if (count != room) __atomic_store_n(&task->mismatch, 1, __ATOMIC_RELAXED);
    }
}

/* Every entry of pre [rows, n] that is positive and >= t, as a flat list of pairs in row-major order:
 * row r's entries go to [starts[r], starts[r + 1]) of vals/idx/pair_rows (starts [rows + 1] from the
 * counts of count_positive_at_least_f32 with the same t; vals/idx need n entries of slack after the
 * last start). Returns 0, or -1 if a row's count differs from its room. */
int64_t collect_positive_at_least_f32(const float *pre, int64_t rows, int64_t n, float t, const int64_t *starts,
                                      float *vals, int64_t *idx, int64_t *pair_rows, int64_t threads) {
    CollectTask task = {pre, starts, n, positive_floor(t), vals, idx, pair_rows, 0};
    parallel_for(rows, threads, collect_range, &task);
    return task.mismatch ? -1 : 0;
}
