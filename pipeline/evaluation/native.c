/* Fused tile loops of the evaluation kernel: the same IEEE float operations, in the same
 * order, as the pure-torch path of pipeline/evaluation/kernel.py (BlockKernel.tile) and
 * the same integer counts as pipeline/evaluation/metrics.py (TileCounter), in one pass
 * over each tile instead of one pass per torch op.
 *
 * Built by pipeline/evaluation/native.py with -ffp-contract=off: the only fused
 * multiply-adds are the explicit fmaf() calls, which stand where torch's addcmul fuses
 * (its vectorised a + b * c compiles to one FMA on AVX2/AVX-512 builds; the tests pin
 * both paths to the same bits). Square roots follow the torch path's
 * max(x, 0) * (1 / sqrt(max(x, FLT_MIN))): exact 0 for x <= 0, never NaN.
 *
 * Tiles are row-major float32 (rows x cols) with a row stride in elements; every
 * pointer argument is a plain C array; nothing here allocates or keeps state, so the
 * kernel's worker threads call these functions concurrently on their own tiles.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

static const float ROOT_FLOOR = 1e-6f; /* kernel.py _ROOT_FLOOR (as float32) */
static const float DEN_FLOOR = 1e-30f; /* kernel.py _DEN_FLOOR (as float32) */

/* max written as a select (not fmaxf, whose NaN rule keeps GCC from vectorising; no NaN reaches here) */
static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline float rsqrt_floored(float x) { return 1.0f / sqrtf(maxf(x, FLT_MIN)); }

/* Row loops written for constant flags: each call site below passes literals, so after
 * inlining every inner loop is branch-free and GCC vectorises it. */
static inline void accum_row(float *nr, const float *tr, int64_t cols, const int first, const int root,
                             const float wqi, const float *wg) {
    for (int64_t j = 0; j < cols; j++) {
        const float x = tr[j];
        float r = rsqrt_floored(x);
        float d = maxf(x, 0.0f);
        if (root) {
            d = d * r;
            float f = wqi * wg[j * 4];
            f = f * f;
            f = f * ROOT_FLOOR;
            d = maxf(d, f);
            r = rsqrt_floored(d);
        }
        nr[j] = first ? d * r : fmaf(d, r, nr[j]);
    }
}

/* One part's contribution to num = sum_i w_p,i w_q,i d_i over a contiguous (rows x cols) tile.
 * t: the part's GEMM output (a_p a_q ||x - y||^2 with the weights inside). first: num is
 * written, not accumulated. part_root (sqrt_euclidean): t holds (w_p w_q)^4 ||x - y||^2; its
 * square root is floored at (w_p w_q)^2 ROOT_FLOOR (the weights are column i of wq / wg,
 * stride 4) before the second root. */
void pven_part_accum(float *num, const float *t, int64_t rows, int64_t cols, int first, int part_root,
                     const float *wq, const float *wg) {
    for (int64_t i = 0; i < rows; i++) {
        float *nr = num + i * cols;
        const float *tr = t + i * cols;
        const float wqi = part_root ? wq[i * 4] : 0.0f;
        if (part_root) {
            if (first) accum_row(nr, tr, cols, 1, 1, wqi, wg); else accum_row(nr, tr, cols, 0, 1, wqi, wg);
        } else {
            if (first) accum_row(nr, tr, cols, 1, 0, 0.0f, wg); else accum_row(nr, tr, cols, 0, 0, 0.0f, wg);
        }
    }
}

static inline void global_row(float *o, const float *gr, int64_t cols, const int squared) {
    for (int64_t j = 0; j < cols; j++) {
        const float dg = maxf(gr[j], 0.0f);
        o[j] = squared ? dg : dg * rsqrt_floored(gr[j]);
    }
}

static inline void local_row(float *o, const float *nr, const float *dr, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) o[j] = nr[j] / maxf(dr[j], DEN_FLOOR);
}

static inline void pven_row(float *o, const float *nr, const float *dr, const float *gr, int64_t cols,
                            const int squared, const int local_sq, const int scale, const float lam) {
    for (int64_t j = 0; j < cols; j++) {
        float l = nr[j] / maxf(dr[j], DEN_FLOOR);
        if (local_sq) l = l * l;
        if (scale) l = l * lam;
        const float dg = maxf(gr[j], 0.0f);
        o[j] = squared ? l + dg : fmaf(dg, rsqrt_floored(gr[j]), l);
    }
}

/* The tile's distances into out (row stride ld_out) from num (part sum), den (sum of weight
 * products, GEMM output) and g (global GEMM output, NULL without a global term).
 * mode: 0 global, 1 local, 2 pven. squared: D_g is the squared distance. local_sq: D_l is
 * squared before lam. The paper variant is (squared 0, local_sq 0), the official (1, 1). */
void pven_finish(float *out, int64_t ld_out, float *num, const float *den, const float *g, int64_t rows,
                 int64_t cols, int mode, int squared, int local_sq, float lam) {
    const int scale = lam != 1.0f;
    for (int64_t i = 0; i < rows; i++) {
        float *o = out + i * ld_out;
        const float *nr = num + i * cols, *dr = den + i * cols, *gr = g ? g + i * cols : 0;
        if (mode == 0) {
            if (squared) global_row(o, gr, cols, 1); else global_row(o, gr, cols, 0);
        } else if (mode == 1) {
            local_row(o, nr, dr, cols);
        } else if (squared && local_sq) {
            if (scale) pven_row(o, nr, dr, gr, cols, 1, 1, 1, lam); else pven_row(o, nr, dr, gr, cols, 1, 1, 0, lam);
        } else if (!squared && !local_sq) {
            if (scale) pven_row(o, nr, dr, gr, cols, 0, 0, 1, lam); else pven_row(o, nr, dr, gr, cols, 0, 0, 0, lam);
        } else if (squared) {
            if (scale) pven_row(o, nr, dr, gr, cols, 1, 0, 1, lam); else pven_row(o, nr, dr, gr, cols, 1, 0, 0, lam);
        } else {
            if (scale) pven_row(o, nr, dr, gr, cols, 0, 1, 1, lam); else pven_row(o, nr, dr, gr, cols, 0, 1, 0, lam);
        }
    }
}

/* Number of the n >= 1 sorted values a[] strictly below x: a branch-free binary search
 * (candidates fall anywhere among the positives, so a branch would mispredict half the time). */
static inline int64_t below(const float *a, int64_t n, float x) {
    const float *base = a;
    while (n > 1) {
        const int64_t half = n >> 1;
        base = base[half] < x ? base + half : base;
        n -= half;
    }
    return (base - a) + (*base < x);
}

/* Counts one tile's negatives into hist, as TileCounter: an entry d of row i is a
 * candidate when d <= pmax[i] (NaN pmax: the row has no positive) and, with codes, its
 * query and gallery codes differ; its bucket is the number of the row's sorted positives
 * ppad[i, :npos[i]] strictly below d, and hist[seg_start[i] + bucket] gains one.
 * Returns the number of candidates counted. */
int64_t pven_count_tile(const float *tile, int64_t ld, int64_t rows, int64_t cols, const float *pmax,
                        const float *ppad, int64_t stride, const int64_t *npos, const int64_t *seg_start,
                        const int64_t *q_codes, const int64_t *g_codes, int64_t *hist) {
    int64_t count = 0;
    for (int64_t i = 0; i < rows; i++) {
        const float pm = pmax[i];
        if (!(pm >= 0.0f)) continue; /* NaN: no positives; distances are >= 0 */
        const float *row = tile + i * ld, *pos = ppad + i * stride;
        const int64_t np = npos[i], qc = q_codes ? q_codes[i] : -1;
        int64_t *h = hist + seg_start[i];
        for (int64_t j = 0; j < cols; j++) {
            const float d = row[j];
            if (!(d <= pm) || (g_codes && g_codes[j] == qc)) continue;
            h[np ? below(pos, np, d) : 0]++;
            count++;
        }
    }
    return count;
}
