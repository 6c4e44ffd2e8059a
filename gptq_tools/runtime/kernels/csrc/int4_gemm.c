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
 * Threads: built with -fopenmp, the loops over column blocks run on the process's OpenMP pool. PyTorch loads
 * its libgomp.so.1 first, so the dynamic loader binds this library to that same runtime: the same worker
 * threads PyTorch's own ops use (a second pool would fight them for the cores).
 */
#include <stdint.h>
#include <string.h>

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
                      int64_t n, int64_t k, int64_t gs, int64_t b, int64_t r0, const int R, const int J0, const int J,
                      int scales_f32) {
    const int32_t *blk = blocks + b * k * L;
    const int64_t col0 = b * BLOCK + L * J0;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) store_floats(out + (r0 + r) * n + col0 + L * j, broadcast(0.0f));
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        if (g0 + gs < k) prefetch_params(scales, zeros, (group + 1) * n + b * BLOCK, scales_f32);
        vi z[8];
        for (int j = 0; j < J; j++) z[j] = load_zeros(zeros + group * n + col0 + L * j) << place(J0 + j);
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
            const vf s = load_scales(scales, group * n + col0 + L * j, scales_f32) * unplace(J0 + j);
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
                    float *out, int64_t n, int64_t k, int64_t gs, int64_t b, int scales_f32) {
    const int32_t *blk = blocks + b * k * L;
    const int64_t col0 = b * BLOCK;
    vf total[8];
    for (int j = 0; j < 8; j++) total[j] = broadcast(0.0f);
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        if (g0 + gs < k) prefetch_params(scales, zeros, (group + 1) * n + col0, scales_f32);
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
            const vf s = load_scales(scales, group * n + col0 + L * j, scales_f32) * unplace(j);
            const vf z = __builtin_convertvector(load_zeros(zeros + group * n + col0 + L * j) << place(j), vf);
            total[j] += (acc[j] - z * sx) * s;
        }
    }
    for (int j = 0; j < 8; j++) store_floats(out + col0 + L * j, total[j]);
}

/* Two passes over a block of R >= 2 rows, nibbles 0..3 and 4..7 (8 nibbles of R rows would not fit the registers). */
#define HALVES(R)                                                                                    \
    do {                                                                                             \
        rows_pass(blocks, scales, zeros, x, out, n, k, gs, b, r0, R, 0, 4, scales_f32);               \
        rows_pass(blocks, scales, zeros, x, out, n, k, gs, b, r0, R, 4, 4, scales_f32);               \
    } while (0)

static void rows_block(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x, float *out,
                       int64_t n, int64_t k, int64_t gs, int64_t b, int64_t r0, int rows, int scales_f32) {
    switch (rows) {
        case 1: one_row(blocks, scales, zeros, x + r0 * k, out + r0 * n, n, k, gs, b, scales_f32); break;
#if ROWS_MAX >= 4
        case 4: HALVES(4); break;
#endif
#if ROWS_MAX >= 3
        case 3: HALVES(3); break;
#endif
        default: HALVES(2); break;
    }
}

/* out (m, n) fp32, columns of blocks [b0, b1): x (m, k) fp32 times the dequantized weight. A lone last row
 * (m % ROWS_MAX == 1: one token, decode) takes the one-row pass, the others the multi-row passes. */
void gptq_int4_gemm(const int32_t *blocks, const void *scales, const uint8_t *zeros, const float *x,
                    float *out, int64_t m, int64_t n, int64_t k, int64_t gs, int64_t b0, int64_t b1,
                    int64_t scales_f32, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t r0 = 0; r0 < m; r0 += ROWS_MAX) {
            const int64_t rows = m - r0 < ROWS_MAX ? m - r0 : ROWS_MAX;
            rows_block(blocks, scales, zeros, x, out, n, k, gs, b, r0, (int)rows, (int)scales_f32);
        }
    }
}

/* w (k rows, ld apart) fp32: the dequantized weight (q - z) * s of blocks [b0, b1), block b0 at column 0. */
void gptq_int4_dequantize(const int32_t *blocks, const void *scales, const uint8_t *zeros, float *w,
                          int64_t n, int64_t k, int64_t gs, int64_t b0, int64_t b1, int64_t ld,
                          int64_t scales_f32, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = b0; b < b1; b++) {
        const int32_t *blk = blocks + b * k * L;
        for (int64_t g0 = 0; g0 < k; g0 += gs) {
            const int64_t group = g0 / gs;
            vf s[8];
            vi z[8];
            for (int j = 0; j < 8; j++) {
                s[j] = load_scales(scales, group * n + b * BLOCK + L * j, (int)scales_f32) * unplace(j);
                z[j] = load_zeros(zeros + group * n + b * BLOCK + L * j) << place(j);
            }
            for (int64_t i = g0; i < g0 + gs; i++) {
                const vi words = load_words(blk + i * L);
                float *row = w + i * ld + (b - b0) * BLOCK;
                for (int j = 0; j < 8; j++) store_floats(row + L * j, weights(words, j, z[j]) * s[j]);
            }
        }
    }
}
