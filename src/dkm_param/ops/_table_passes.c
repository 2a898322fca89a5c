/* The passes of ops/table.py over a weight, one loop each (loaded by ops/native.py).
 *
 * A half-precision weight (bfloat16 or float16) is read as its 16-bit patterns,
 * each its own table entry; a float32 weight is read on a grid, each value at
 * entry (int)min(max((v - low) * scale + 0.5, 0), size - 1). The arithmetic per
 * weight is that of the torch operations the passes replace, in the same order
 * (compiled without contraction into fused multiply-adds), and float32 results
 * are rounded to the weight's dtype to nearest, ties to even, as torch does.
 * Counts and sums are added into the caller's arrays. A float32 value that is NaN counts at
 * the first point (so that nothing is read or written out of place) and the grid's passes
 * return how many there were, for the caller to refuse; the grid has at most 2^24 points.
 *
 * Built with OpenMP where torch uses it, each loop is shared among the calling
 * thread's OpenMP team: the library loads torch's own OpenMP runtime (its
 * soname is the system's), so the threads are torch's intra-op threads, as
 * many as torch.set_num_threads set. A thread counts or sums its contiguous
 * share of the weights into an array of its own, and the arrays are added in
 * thread order: the same bits for the same number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int64_t dkm_table_passes_version(void) { return 4; }

#ifdef _OPENMP
/* threads for a loop over n weights: torch's, at most one per GRAIN of them (as torch's own loops) */
#define GRAIN 32768
static int team(int64_t n) {
    const int most = omp_get_max_threads();
    return n / GRAIN + 1 < most ? (int)(n / GRAIN + 1) : most;
}

/* the share [*lo, *hi) of n weights of thread t of threads */
static inline void share(int64_t n, int t, int threads, int64_t *lo, int64_t *hi) {
    *lo = n * t / threads;
    *hi = n * (t + 1) / threads;
}

/* Runs BODY (over weights i from lo to hi, adding into TYPE *into, and to int64_t bad the NaN found)
 * on each thread of the team: thread 0 into OUT, the others into arrays of their own, added to OUT
 * in thread order after; the NaN found are added to *FOUND. At most one thread per SIZE weights
 * beyond the first: the arrays are no larger than the weights. */
#define EACH_SHARE(TYPE, OUT, SIZE, N, FOUND, BODY) do {                                                 \
    int wanted = team(N);                                                                             \
    if ((int64_t)wanted > 1 + (N) / (SIZE)) wanted = (int)(1 + (N) / (SIZE));                        \
    TYPE *parts = wanted > 1 ? (TYPE *)calloc((size_t)(wanted - 1) * (size_t)(SIZE), sizeof(TYPE)) : NULL; \
    int threads = 1;                                                                                  \
    if (parts) {                                                                                      \
        _Pragma("omp parallel num_threads(wanted)")                                                   \
        {                                                                                             \
            const int t = omp_get_thread_num();                                                      \
            _Pragma("omp single")                                                                     \
            threads = omp_get_num_threads();                                                         \
            int64_t lo, hi, bad = 0;                                                                  \
            share(N, t, threads, &lo, &hi);                                                           \
            TYPE *into = t == 0 ? (OUT) : parts + (size_t)(t - 1) * (size_t)(SIZE);                  \
            BODY                                                                                      \
            _Pragma("omp atomic")                                                                     \
            *(FOUND) += bad;                                                                          \
        }                                                                                             \
        for (int t = 1; t < threads; t++)                                                             \
            for (int64_t e = 0; e < (SIZE); e++) (OUT)[e] += parts[(size_t)(t - 1) * (size_t)(SIZE) + e]; \
        free(parts);                                                                                  \
    } else {                                                                                          \
        const int64_t lo = 0, hi = (N);                                                               \
        int64_t bad = 0;                                                                              \
        TYPE *into = (OUT);                                                                           \
        BODY                                                                                          \
        *(FOUND) += bad;                                                                              \
    }                                                                                                 \
} while (0)
/* a loop over the n weights of the function it is in, shared among the team */
#define EACH_WEIGHT _Pragma("omp parallel for schedule(static) num_threads(team(n))")
/* the same, adding up the NaN found in int64_t bad */
#define EACH_WEIGHT_FINDING _Pragma("omp parallel for schedule(static) num_threads(team(n)) reduction(+:bad)")
#else
#define EACH_SHARE(TYPE, OUT, SIZE, N, FOUND, BODY) do {                                                 \
    const int64_t lo = 0, hi = (N);                                                                   \
    int64_t bad = 0;                                                                                  \
    TYPE *into = (OUT);                                                                               \
    BODY                                                                                              \
    *(FOUND) += bad;                                                                                  \
} while (0)
#define EACH_WEIGHT
#define EACH_WEIGHT_FINDING
#endif

static inline float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t b = to_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

/* IEEE half precision, as c10::Half converts (M. Dukhan's FP16 routines) */
static inline float f16_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized)));
}

static inline uint16_t float_to_f16(float f) {
    float base = (from_bits(to_bits(f) & 0x7fffffffu) * from_bits(0x77800000u)) * from_bits(0x08800000u);
    const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float half_to_float(uint16_t h, int bf16) { return bf16 ? bf16_to_float(h) : f16_to_float(h); }
static inline uint16_t float_to_half(float f, int bf16) { return bf16 ? float_to_bf16(f) : float_to_f16(f); }

/* the grid entries of a block of at most BLOCK float32 values: a loop the compiler vectorizes, apart
 * from the loop that reads or writes the tables by entry (which it cannot) */
#define BLOCK 256
static inline int64_t grid_entries(const float *v, int64_t n, float low, float scale, int64_t size,
                                   int32_t *entries) {
    const float last = (float)(size - 1);
    int64_t nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float t = (v[i] - low) * scale + 0.5f;
        nan += t != t;
        t = t > 0.0f ? t : 0.0f;  /* torch's clamp, and NaN to the first point */
        t = t < last ? t : last;
        entries[i] = (int32_t)t;
    }
    return nan;
}

/* for each block [s, s + m) of the weights from lo to hi, with their grid entries in e */
#define EACH_BLOCK(lo, hi, BODY) do {                                                                   \
    int32_t e[BLOCK];                                                                                 \
    for (int64_t s = (lo); s < (hi); s += BLOCK) {                                                    \
        const int64_t m = (hi) - s < BLOCK ? (hi) - s : BLOCK;                                       \
        bad += grid_entries(v + s, m, low, scale, size, e);                                           \
        BODY                                                                                          \
    }                                                                                                 \
} while (0)

void dkm_count_half(const uint16_t *v, int64_t n, int64_t *counts) {
    int64_t found = 0;
    EACH_SHARE(int64_t, counts, 65536, n, &found, for (int64_t i = lo; i < hi; i++) into[v[i]]++;);
}

int64_t dkm_count_grid(const float *v, int64_t n, float low, float scale, int64_t size, int64_t *counts) {
    int64_t found = 0;
    EACH_SHARE(int64_t, counts, size, n, &found,
               EACH_BLOCK(lo, hi, for (int64_t j = 0; j < m; j++) into[e[j]]++;););
    return found;
}

void dkm_lookup_half(const uint16_t *v, int64_t n, const uint16_t *table, uint16_t *out) {
    EACH_WEIGHT
    for (int64_t i = 0; i < n; i++) out[i] = table[v[i]];
}

/* base[e] + v * slope[e]: the soft value to first order about the grid point */
int64_t dkm_lookup_line(const float *v, int64_t n, float low, float scale, int64_t size, const float *base,
                        const float *slope, float *out) {
    int64_t bad = 0;
    EACH_WEIGHT_FINDING
    for (int64_t b = 0; b < n; b += BLOCK) {
        EACH_BLOCK(b, b + BLOCK < n ? b + BLOCK : n, for (int64_t j = 0; j < m; j++) {
            const float moved = slope[e[j]] * v[s + j];
            out[s + j] = moved + base[e[j]];
        });
    }
    return bad;
}

/* the loops below are written once for each half dtype, the flag tested outside them */
#define EACH_HALF(bf16, loop) do { if (bf16) { const int is_bf16 = 1; loop } else { const int is_bf16 = 0; loop } } while (0)

void dkm_gather_half(const uint16_t *v, const uint16_t *g, int64_t n, int bf16, double *sums) {
    int64_t found = 0;
    EACH_HALF(bf16, EACH_SHARE(double, sums, 65536, n, &found,
        for (int64_t i = lo; i < hi; i++) into[v[i]] += half_to_float(g[i], is_bf16);););
}

int64_t dkm_gather_grid(const float *v, const float *g, int64_t n, float low, float scale, int64_t size,
                        double *sums) {
    int64_t found = 0;
    EACH_SHARE(double, sums, size, n, &found,
               EACH_BLOCK(lo, hi, for (int64_t j = 0; j < m; j++) into[e[j]] += g[s + j];););
    return found;
}

/* g a[e] + b[e], rounded to the weight's dtype */
void dkm_spread_half(const uint16_t *v, const uint16_t *g, int64_t n, int bf16, const float *a, const float *b,
                     uint16_t *out) {
    EACH_HALF(bf16, {
        EACH_WEIGHT
        for (int64_t i = 0; i < n; i++) {
            const float direct = a[v[i]] * half_to_float(g[i], is_bf16);
            out[i] = float_to_half(direct + b[v[i]], is_bf16);
        }
    });
}

/* ((bend[e] v + base[e]) g) + shared[e]: the slope at v to first order, times g, plus the codebooks' share */
int64_t dkm_spread_grid(const float *v, const float *g, int64_t n, float low, float scale, int64_t size,
                        const float *base, const float *bend, const float *shared, float *out) {
    int64_t bad = 0;
    EACH_WEIGHT_FINDING
    for (int64_t b = 0; b < n; b += BLOCK) {
        EACH_BLOCK(b, b + BLOCK < n ? b + BLOCK : n, for (int64_t j = 0; j < m; j++) {
            const float slope = bend[e[j]] * v[s + j] + base[e[j]];
            out[s + j] = slope * g[s + j] + shared[e[j]];
        });
    }
    return bad;
}
