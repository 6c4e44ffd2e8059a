/* The native int4 kernel's loops, one source for every CPU: gptq_tools/kernels/cpu_int4_native.py builds it
 * three ways and loads the build the CPU can run:
 *   avx512:   -mavx512f -mavx512bw -mavx2 -mfma -mf16c   (16 floats a vector)
 *   avx2:     -mavx2 -mfma -mf16c                         (8 floats a vector)
 *   portable: no ISA flags                                (4 floats a vector: SSE2 on x86-64, NEON on aarch64)
 * The loops are written once with GCC/Clang vector extensions; the compiler maps them onto the ISA the flags
 * allow. No intrinsics, so the same file builds on any CPU a C compiler targets.
 *
 * Weights: blocks of 8 * L output columns (L = floats a vector, gptq_int4_lanes), (blocks, K, L) 32-bit words;
 * nibble j of word l of row k is column l + L * j of the block. One vector load is a row's whole block, and
 * (word >> 4j) & 15 is L consecutive columns in the L lanes: no byte shuffles. Scales: fp16, or fp32 where fp16
 * would round them (scales_f32 = 1), (groups, N). Zeros: uint8 (groups, N).
 * A weight is (q - z) * s, exactly as the fp32 dequantized reference computes it. All arithmetic is fp32:
 * per group, sum_k x_k * (q_k - z) is accumulated (q - z is a small integer, exact in int32 and in fp32), then
 * s times it is added to the output.
 *
 * Threads: a pool of our own (pthreads), not OpenMP's. A call is split into items (column blocks) that the
 * calling thread and the pool's workers claim one at a time; the caller waits only for items a worker has
 * already claimed, never for a worker that has not woken up. On a busy machine a descheduled worker therefore
 * costs at most one item, not the whole call (an OpenMP team's barrier waits for every thread to arrive, and
 * waking a sleeping vCPU on a VM costs tens of microseconds per call). Between calls the workers spin for a
 * while (gptq_pool_set_spin, yielding the core to anything else runnable) so that the next call of a decode
 * step finds them awake, then sleep. Which thread computes an item changes no bit of the result.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* L: floats a vector. ROWS_MAX: input rows a multi-row pass serves (one row takes one_row below). */
#if defined(__AVX512F__)
#define L 16
#define ROWS_MAX 4 /* 4 rows x 4 vectors: 16 accumulators of 32 registers */
const char *const gptq_int4_build = "avx512";
#elif defined(__AVX2__)
#define L 8
#define ROWS_MAX 3 /* 3 rows x 4 vectors: 12 accumulators and 4 weights of 16 registers */
const char *const gptq_int4_build = "avx2";
#else
#define L 4
#define ROWS_MAX 2
const char *const gptq_int4_build = "portable";
#endif

const int32_t gptq_int4_lanes = L;

#define BLOCK (8 * L) /* columns of a block: 8 nibbles of L words */
#define PREFETCH_BYTES 4096

typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));

#define INLINE static inline __attribute__((always_inline))

INLINE vi load_words(const int32_t *p) {
    vi v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE vf load_floats(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store_floats(float *p, vf v) { memcpy(p, &v, sizeof v); }

INLINE vf broadcast(float x) { return x - (vf){0}; } /* x - 0 is x for every x: folded to a plain splat */

/* fp16 bits to fp32, exactly (subnormals, infinities and NaN included); F16C's vcvtph2ps where the flags allow. */
INLINE float half_to_float(uint16_t h) {
#if (defined(__F16C__) || defined(__aarch64__)) && defined(__FLT16_MAX__)
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, mant = h & 1023, bits;
    if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else {
        float value = (float)mant * (1.0f / 16777216.0f); /* mant * 2^-24: exact */
        memcpy(&bits, &value, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

/* Once per group and vector: not on the hot path. */
INLINE vf load_scales(const void *scales, int64_t index, int scales_f32) {
    if (scales_f32) return load_floats((const float *)scales + index);
    const uint16_t *h = (const uint16_t *)scales + index;
    vf out = {0};
    for (int l = 0; l < L; l++) out[l] = half_to_float(h[l]);
    return out;
}

INLINE vi load_zeros(const uint8_t *zeros) {
    vi out = {0};
    for (int l = 0; l < L; l++) out[l] = zeros[l];
    return out;
}

/* The next group's scales and zeros of a block: n columns apart from this group's, so far from anything the
 * hardware prefetcher follows; asked for a group ahead, their loads at the group's end do not wait on memory. */
INLINE void prefetch_params(const void *scales, const uint8_t *zeros, int64_t index, int scales_f32) {
    const char *s = (const char *)scales + index * (scales_f32 ? 4 : 2);
    for (int byte = 0; byte < BLOCK * (scales_f32 ? 4 : 2); byte += 64) __builtin_prefetch(s + byte);
    for (int byte = 0; byte < BLOCK; byte += 64) __builtin_prefetch(zeros + index + byte);
}

/* Nibble j's power of two: its values are taken in place, (q - z) * 2^(4 * shift(j)), with no shift (but for the
 * top nibble, shifted down 4 so the sign bit stays clear). Small integers times a power of two: exact in int32
 * and in fp32, and scaling by a power of two changes no rounding, so the sums are bit for bit those of q - z. */
INLINE int place(int j) { return j < 7 ? 4 * j : 24; }

/* Columns [L * j, L * j + L) of a row's block as (q - z) * 2^place(j) in fp32; zs = z << place(j). */
INLINE vf weights(vi words, int j, vi zs) {
    const vi in_place = j < 7 ? words : words >> 4;
    return __builtin_convertvector((in_place & (15 << place(j))) - zs, vf);
}

/* 2^-place(j), exactly. */
INLINE float unplace(int j) { return 1.0f / (float)(1 << place(j)); }

/* Rows [r0, r0 + R) of out (m, n) = x @ W for nibbles [J0, J0 + J) of block b (columns L * J0 .. L * (J0 + J)):
 * R * J accumulators (R >= 2: enough FMA chains for the FMA's latency), so each unpacked weight serves R rows. */
INLINE void rows_pass(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x, float *out,
                      int64_t n, int64_t ldp, int64_t k, int64_t gs, int64_t b, int64_t r0, const int R, const int J0,
                      const int J,
                      int scales_f32) {
    const int32_t *blk = blocks + b * k * L;
    const int64_t col0 = b * BLOCK + L * J0;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) store_floats(out + (r0 + r) * n + col0 + L * j, broadcast(0.0f));
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        if (g0 + gs < k) prefetch_params(scales, zeros, (group + 1) * ldp + b * BLOCK, scales_f32);
        vi z[8];
        for (int j = 0; j < J; j++) z[j] = load_zeros(zeros + group * ldp + col0 + L * j) << place(J0 + j);
        vf acc[ROWS_MAX][8];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < J; j++) acc[r][j] = broadcast(0.0f);
        const int32_t *p = blk + g0 * L;
        const float *xr = x + r0 * k + g0;
        for (int64_t i = 0; i < gs; i++) {
            if ((i * L * 4) % 64 == 0) __builtin_prefetch((const char *)(p + i * L) + PREFETCH_BYTES);
            const vi words = load_words(p + i * L);
            vf w[8];
            for (int j = 0; j < J; j++) w[j] = weights(words, J0 + j, z[j]);
            for (int r = 0; r < R; r++) {
                const vf xb = broadcast(xr[r * k + i]);
                for (int j = 0; j < J; j++) acc[r][j] += xb * w[j];
            }
        }
        for (int j = 0; j < J; j++) {
            const vf s = load_scales(scales, group * ldp + col0 + L * j, scales_f32) * unplace(J0 + j);
            for (int r = 0; r < R; r++) {
                float *o = out + (r0 + r) * n + col0 + L * j;
                store_floats(o, acc[r][j] * s + load_floats(o));
            }
        }
    }
}

/* One input row, every nibble of a block in one pass (each word read once), with the zero point taken out of
 * the loop: per group, acc_j = sum_k x_k * q_k (q in place, times 2^place(j)) and, at the group's end,
 * s * (acc_j - z * sum_k x_k). Per word: a mask, a conversion and an FMA per nibble, and 8 accumulators: enough
 * independent FMA chains for the FMA's latency, few enough for AVX2's 16 registers. The arithmetic is fp32
 * throughout; the sums are regrouped (the reference subtracts z from each q first), which rounds differently,
 * by about fp32's epsilon times sum |x * q * s|: far below fp16 rounding. sum_k x_k is accumulated in the same
 * loop, in a vector (every lane the same), so no separate pass over x is needed. */
INLINE void one_row(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x,
                    float *out, int64_t ldp, int64_t k, int64_t gs, int64_t b, int scales_f32) {
    const int32_t *blk = blocks + b * k * L;
    const int64_t col0 = b * BLOCK;
    vf total[8];
    for (int j = 0; j < 8; j++) total[j] = broadcast(0.0f);
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        if (g0 + gs < k) prefetch_params(scales, zeros, (group + 1) * ldp + col0, scales_f32);
        vf acc[8], sx = broadcast(0.0f);
        for (int j = 0; j < 8; j++) acc[j] = broadcast(0.0f);
        const int32_t *p = blk + g0 * L;
        const float *xr = x + g0;
        for (int64_t i = 0; i < gs; i++) {
            if ((i * L * 4) % 64 == 0) __builtin_prefetch((const char *)(p + i * L) + PREFETCH_BYTES);
            const vi words = load_words(p + i * L);
            const vf xb = broadcast(xr[i]);
            sx += xb;
            for (int j = 0; j < 8; j++) {
                const vi in_place = j < 7 ? words : words >> 4;
                acc[j] += xb * __builtin_convertvector(in_place & (15 << place(j)), vf);
            }
        }
        for (int j = 0; j < 8; j++) {
            const vf s = load_scales(scales, group * ldp + col0 + L * j, scales_f32) * unplace(j);
            const vf z = __builtin_convertvector(load_zeros(zeros + group * ldp + col0 + L * j) << place(j), vf);
            total[j] += (acc[j] - z * sx) * s;
        }
    }
    for (int j = 0; j < 8; j++) store_floats(out + col0 + L * j, total[j]);
}

/* ------------------------------------------------------------------------------------------------ the pool */
#define POOL_MAX 255 /* workers at most: the caller is the call's first thread */

typedef void (*item_fn)(const void *ctx, int64_t item);

typedef struct {
    item_fn fn;
    const void *ctx;
    int64_t items;
    _Atomic int64_t next;   /* the next item to claim */
    int helpers;            /* workers that may join */
    int joined;             /* workers that joined (under the pool's mutex) */
    _Atomic int active;     /* joined workers not yet done */
} job_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    job_t *job;               /* the job open for joining (under mu), NULL when none */
    _Atomic uint64_t posted;  /* jobs posted so far: what a spinning worker watches */
    int started;              /* workers running (under mu) */
    int sleeping;             /* workers waiting on wake (under mu) */
    int atfork;               /* the fork handler is registered */
    _Atomic int64_t spin_ns;  /* how long an idle worker spins before it sleeps */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0, 1000000};

static int64_t clock_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void run_items(job_t *job) {
    int64_t item;
    while ((item = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed)) < job->items)
        job->fn(job->ctx, item);
}

static void *worker_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool.mu);
    uint64_t seen = atomic_load(&pool.posted);
    pthread_mutex_unlock(&pool.mu);
    for (;;) {
        /* spin (yielding the core to anything runnable) until a job is posted or the spin time is over */
        const int64_t spin = atomic_load_explicit(&pool.spin_ns, memory_order_relaxed), start = clock_ns();
        for (int i = 1; atomic_load_explicit(&pool.posted, memory_order_acquire) == seen; i++) {
            cpu_relax();
            if (i % 256 == 0) {
                if (clock_ns() - start >= spin) break;
                sched_yield();
            }
        }
        pthread_mutex_lock(&pool.mu);
        if (atomic_load(&pool.posted) == seen) {
            pool.sleeping++;
            while (atomic_load(&pool.posted) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pool.sleeping--;
        }
        seen = atomic_load(&pool.posted);
        job_t *job = pool.job;
        if (job != NULL && job->joined < job->helpers) {
            job->joined++;
            atomic_fetch_add_explicit(&job->active, 1, memory_order_relaxed);
        } else {
            job = NULL;
        }
        pthread_mutex_unlock(&pool.mu);
        if (job != NULL) {
            run_items(job);
            atomic_fetch_sub_explicit(&job->active, 1, memory_order_release);
        }
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the parent's workers and start afresh. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.job = NULL;
    pool.started = 0;
    pool.sleeping = 0;
}

/* fn(ctx, item) for every item in [0, items), on up to `threads` threads (the caller one of them). */
static void parallel_items(item_fn fn, const void *ctx, int64_t items, int64_t threads) {
    job_t job = {fn, ctx, items, 0, 0, 0, 0};
    int64_t helpers = threads - 1;
    if (helpers > items - 1) helpers = items - 1;
    if (helpers > POOL_MAX) helpers = POOL_MAX;
    if (helpers <= 0) {
        run_items(&job);
        return;
    }
    job.helpers = (int)helpers;
    pthread_mutex_lock(&pool.mu);
    if (!pool.atfork) pool.atfork = pthread_atfork(NULL, NULL, pool_after_fork_in_child) == 0;
    while (pool.started < helpers) { /* a worker that cannot start leaves the items to the others */
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    pool.job = &job;
    atomic_fetch_add_explicit(&pool.posted, 1, memory_order_release);
    if (pool.sleeping) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_items(&job);
    pthread_mutex_lock(&pool.mu); /* closed: no worker joins from here on */
    pool.job = NULL;
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; atomic_load_explicit(&job.active, memory_order_acquire) > 0; i++) {
        cpu_relax(); /* a joined worker is finishing its last item */
        if (i % 256 == 0) sched_yield();
    }
}

/* How long (nanoseconds) an idle worker spins before it sleeps: 0 sleeps at once. */
void gptq_pool_set_spin(int64_t ns) { atomic_store(&pool.spin_ns, ns < 0 ? 0 : ns); }

/* Two passes over a block of R >= 2 rows, nibbles 0..3 and 4..7 (8 nibbles of R rows would not fit the registers). */
#define HALVES(R)                                                                                    \
    do {                                                                                             \
        rows_pass(blocks, scales, zeros, x, out, n, ldp, k, gs, b, r0, R, 0, 4, scales_f32);          \
        rows_pass(blocks, scales, zeros, x, out, n, ldp, k, gs, b, r0, R, 4, 4, scales_f32);          \
    } while (0)

static void rows_block(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x, float *out,
                       int64_t n, int64_t ldp, int64_t k, int64_t gs, int64_t b, int64_t r0, int rows,
                       int scales_f32) {
    switch (rows) {
        case 1: one_row(blocks, scales, zeros, x + r0 * k, out + r0 * n, ldp, k, gs, b, scales_f32); break;
#if ROWS_MAX >= 4
        case 4: HALVES(4); break;
#endif
#if ROWS_MAX >= 3
        case 3: HALVES(3); break;
#endif
        default: HALVES(2); break;
    }
}

typedef struct {
    const int32_t *blocks;
    const void *scales;
    const uint8_t *zeros;
    const float *x;
    float *out;
    int64_t m, n, ldp, k, gs, b0, ld; /* n: out's row stride; ldp: the scales' and zeros' */
    int scales_f32;
} call_t;

static void gemm_item(const void *ctx, int64_t item) {
    const call_t *c = ctx;
    const int64_t b = c->b0 + item;
    for (int64_t r0 = 0; r0 < c->m; r0 += ROWS_MAX) {
        const int64_t rows = c->m - r0 < ROWS_MAX ? c->m - r0 : ROWS_MAX;
        rows_block(c->blocks, c->scales, c->zeros, c->x, c->out, c->n, c->ldp, c->k, c->gs, b, r0, (int)rows,
                   c->scales_f32);
    }
}

/* out (m, n) fp32, columns of blocks [b0, b1): x (m, k) fp32 times the dequantized weight; scales and zeros
 * (groups, ldp), ldp >= n (a layer whose parameters are columns of a wider group's). A lone last row
 * (m % ROWS_MAX == 1: one token, decode) takes the one-row pass, the others the multi-row passes. */
void gptq_int4_gemm(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x,
                    float *out, int64_t m, int64_t n, int64_t ldp, int64_t k, int64_t gs, int64_t b0, int64_t b1,
                    int64_t scales_f32, int64_t threads) {
    const call_t call = {blocks, scales, zeros, x, out, m, n, ldp, k, gs, b0, 0, (int)scales_f32};
    parallel_items(gemm_item, &call, b1 - b0, threads);
}

static void dequantize_item(const void *ctx, int64_t item) {
    const call_t *c = ctx;
    const int64_t b = c->b0 + item, ldp = c->ldp, k = c->k, gs = c->gs;
    const int32_t *blk = c->blocks + b * k * L;
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        vf s[8];
        vi z[8];
        for (int j = 0; j < 8; j++) {
            s[j] = load_scales(c->scales, group * ldp + b * BLOCK + L * j, c->scales_f32) * unplace(j);
            z[j] = load_zeros(c->zeros + group * ldp + b * BLOCK + L * j) << place(j);
        }
        for (int64_t i = g0; i < g0 + gs; i++) {
            const vi words = load_words(blk + i * L);
            float *row = c->out + i * c->ld + item * BLOCK;
            for (int j = 0; j < 8; j++) store_floats(row + L * j, weights(words, j, z[j]) * s[j]);
        }
    }
}

/* w (k rows, ld apart) fp32: the dequantized weight (q - z) * s of blocks [b0, b1), block b0 at column 0;
 * scales and zeros (groups, ldp). */
void gptq_int4_dequantize(const int32_t *blocks, const void *scales, const uint8_t *zeros, float *w,
                          int64_t ldp, int64_t k, int64_t gs, int64_t b0, int64_t b1, int64_t ld,
                          int64_t scales_f32, int64_t threads) {
    const call_t call = {blocks, scales, zeros, NULL, w, 0, 0, ldp, k, gs, b0, ld, (int)scales_f32};
    parallel_items(dequantize_item, &call, b1 - b0, threads);
}

/* ----------------------------------------------------------------------------- fp16-stored fp32 linear layers */
/* A layer the checkpoint stores in fp16 (an untied lm_head) computed in fp32: each weight converted exactly to
 * fp32 in registers (half the bytes of an fp32 copy, the same products), fp32 accumulation. */

typedef uint16_t vh __attribute__((vector_size(L * 2)));
typedef uint32_t vu __attribute__((vector_size(L * 4)));
#define HALF_ROWS 4 /* output rows a pass: each x vector loaded once serves 4 weight rows */

/* L fp16 values to fp32, exactly: the bits shifted into fp32 position and rescaled by 2^112 (normals and
 * subnormals), infinities and NaN kept. Integer and multiply operations only, so every build vectorizes it. */
INLINE vf halves_to_floats(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    const vu bits = __builtin_convertvector(h, vu), magnitude = bits & 0x7fff;
    vf value;
    vu shifted = magnitude << 13;
    memcpy(&value, &shifted, sizeof value);
    value *= 0x1p112f;
    vu out;
    memcpy(&out, &value, sizeof out);
    out |= (vu)(magnitude >= 0x7c00) & 0x7f800000u; /* exponent 31: infinity or NaN (its payload kept) */
    out |= (bits & 0x8000) << 16;
    memcpy(&value, &out, sizeof value);
    return value;
}

typedef struct {
    const uint16_t *w; /* (n, k) fp16 bits */
    const float *x;    /* (m, k) */
    float *out;        /* (m, n) */
    int64_t m, n, k, rows_per_item;
} half_call_t;

static void half_item(const void *ctx, int64_t item) {
    const half_call_t *c = ctx;
    const int64_t k = c->k, first = item * c->rows_per_item;
    const int64_t last = first + c->rows_per_item < c->n ? first + c->rows_per_item : c->n;
    const int64_t vectors = k / L;
    for (int64_t r = 0; r < c->m; r++) {
        const float *x = c->x + r * k;
        for (int64_t j0 = first; j0 < last; j0 += HALF_ROWS) {
            const int rows = last - j0 < HALF_ROWS ? (int)(last - j0) : HALF_ROWS;
            vf acc[HALF_ROWS];
            for (int j = 0; j < HALF_ROWS; j++) acc[j] = broadcast(0.0f);
            for (int64_t v = 0; v < vectors; v++) {
                const vf xv = load_floats(x + v * L);
                for (int j = 0; j < rows; j++) acc[j] += xv * halves_to_floats(c->w + (j0 + j) * k + v * L);
            }
            for (int j = 0; j < rows; j++) {
                float sum = 0.0f;
                for (int l = 0; l < L; l++) sum += acc[j][l];
                for (int64_t i = vectors * L; i < k; i++) sum += x[i] * half_to_float(c->w[(j0 + j) * k + i]);
                c->out[r * c->n + j0 + j] = sum;
            }
        }
    }
}

/* out (m, n) = x (m, k) @ w.T for w (n, k) in fp16, in fp32; rows of w split across threads 64 at a time. */
void gptq_f16_gemm(const uint16_t *w, const float *x, float *out, int64_t m, int64_t n, int64_t k, int64_t threads) {
    const half_call_t call = {w, x, out, m, n, k, 64};
    parallel_items(half_item, &call, (n + 63) / 64, threads);
}
