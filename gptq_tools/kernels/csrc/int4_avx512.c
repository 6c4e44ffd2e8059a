/* The cpu-int4-avx512 kernel's loops (gptq_tools/kernels/cpu_int4_avx512.py builds and loads this file).
 *
 * Weights: 4-bit values in 64-column blocks, (blocks, K, 32) bytes; the low nibble of byte j of row k is
 * column j of the block, the high nibble column j + 32. Scales: fp16, or fp32 where fp16 would round them
 * (scales_f32 = 1), (groups, N). Zeros: uint8 (groups, N).
 * A weight is (q - z) * s, exactly as the fp32 dequantized reference computes it. All arithmetic is fp32:
 * per group, sum_k x_k * (q_k - z) is accumulated (q - z is a small integer, formed exactly in int8), then
 * s times it is added to the output.
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_BYTES 4096

/* Threads: built with -fopenmp, the loops over column blocks run on the process's OpenMP pool. PyTorch
 * loads its libgomp.so.1 first, so the dynamic loader binds this library to that same runtime: the same
 * worker threads PyTorch's own ops use (a second pool would fight them for the cores). */

static inline __attribute__((always_inline)) __m512 load_scales(const void *scales, int64_t index, int scales_f32) {
    if (scales_f32) return _mm512_loadu_ps((const float *)scales + index);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)scales + index)));
}

/* 64 weights of one row as q - z in fp32 (z: the zero points of the block's columns 0..31 and 32..63 as bytes;
 * q - z is a small integer, formed exactly in int8). */
static inline __attribute__((always_inline)) void unpack(const uint8_t *p, __m256i z_lo, __m256i z_hi, __m512 w[4]) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __m256i mask = _mm256_set1_epi8(15);
    __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, mask), z_lo);
    __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), z_hi);
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(lo)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(lo, 1)));
    w[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(hi)));
    w[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(hi, 1)));
}

/* Rows [r0, r0 + R) of out (m, n) += x @ W for the columns of block b. */
static inline __attribute__((always_inline)) void rows_block(const uint8_t *blocks, const void *scales,
                                                             const uint8_t *zeros, const float *x, float *out,
                                                             int64_t n, int64_t k, int64_t gs, int64_t b,
                                                             int64_t r0, const int R, int scales_f32) {
    const uint8_t *blk = blocks + b * k * 32;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + (r0 + r) * n + b * 64 + 16 * j, _mm512_setzero_ps());
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        __m512 acc[4][4];
        const __m256i z_lo = _mm256_loadu_si256((const __m256i *)(zeros + group * n + b * 64));
        const __m256i z_hi = _mm256_loadu_si256((const __m256i *)(zeros + group * n + b * 64 + 32));
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        const uint8_t *p = blk + g0 * 32;
        for (int64_t i = 0; i < gs; i++) {
            if ((i & 1) == 0) _mm_prefetch((const char *)(p + i * 32 + PREFETCH_BYTES), _MM_HINT_T0);
            __m512 w[4];
            unpack(p + i * 32, z_lo, z_hi, w);
            for (int r = 0; r < R; r++) {
                __m512 xb = _mm512_set1_ps(x[(r0 + r) * k + g0 + i]);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(xb, w[j], acc[r][j]);
            }
        }
        for (int j = 0; j < 4; j++) {
            __m512 s = load_scales(scales, group * n + b * 64 + 16 * j, scales_f32);
            for (int r = 0; r < R; r++) {
                float *o = out + (r0 + r) * n + b * 64 + 16 * j;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(acc[r][j], s, _mm512_loadu_ps(o)));
            }
        }
    }
}

/* Rows [r0, r0 + 8) of out (m, n) += x @ W for half of block b's columns (half 0: 0..31, from the low
 * nibbles; half 1: 32..63, from the high ones): 16 accumulators, so each unpacked weight serves 8 rows. */
static void rows8_half(const uint8_t *blocks, const void *scales, const uint8_t *zeros, const float *x, float *out,
                       int64_t n, int64_t k, int64_t gs, int64_t b, int64_t r0, int half, int scales_f32) {
    const uint8_t *blk = blocks + b * k * 32;
    const int64_t col0 = b * 64 + 32 * half;
    for (int r = 0; r < 8; r++)
        for (int j = 0; j < 2; j++) _mm512_storeu_ps(out + (r0 + r) * n + col0 + 16 * j, _mm512_setzero_ps());
    const __m256i mask = _mm256_set1_epi8(15);
    for (int64_t g0 = 0; g0 < k; g0 += gs) {
        const int64_t group = g0 / gs;
        const __m256i z = _mm256_loadu_si256((const __m256i *)(zeros + group * n + col0));
        __m512 acc[8][2];
        for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const uint8_t *p = blk + g0 * 32;
        const float *xr = x + r0 * k + g0;
        for (int64_t i = 0; i < gs; i++) {
            if ((i & 1) == 0) _mm_prefetch((const char *)(p + i * 32 + PREFETCH_BYTES), _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(p + i * 32));
            __m256i q = half ? _mm256_srli_epi16(v, 4) : v;
            q = _mm256_sub_epi8(_mm256_and_si256(q, mask), z);
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            for (int r = 0; r < 8; r++) {
                __m512 xb = _mm512_set1_ps(xr[r * k + i]);
                acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
            }
        }
        for (int j = 0; j < 2; j++) {
            __m512 s = load_scales(scales, group * n + col0 + 16 * j, scales_f32);
            for (int r = 0; r < 8; r++) {
                float *o = out + (r0 + r) * n + col0 + 16 * j;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(acc[r][j], s, _mm512_loadu_ps(o)));
            }
        }
    }
}

/* out (m, n) fp32, columns of blocks [b0, b1): x (m, k) fp32 times the dequantized weight. */
void gptq_int4_gemm(const uint8_t *blocks, const void *scales, const uint8_t *zeros, const float *x,
                    float *out, int64_t m, int64_t n, int64_t k, int64_t gs, int64_t b0, int64_t b1,
                    int64_t scales_f32, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = b0; b < b1; b++) {
        int64_t r0 = 0;
        for (; r0 + 8 <= m; r0 += 8) {
            rows8_half(blocks, scales, zeros, x, out, n, k, gs, b, r0, 0, (int)scales_f32);
            rows8_half(blocks, scales, zeros, x, out, n, k, gs, b, r0, 1, (int)scales_f32);
        }
        for (; r0 + 4 <= m; r0 += 4) rows_block(blocks, scales, zeros, x, out, n, k, gs, b, r0, 4, (int)scales_f32);
        switch (m - r0) {
            case 3: rows_block(blocks, scales, zeros, x, out, n, k, gs, b, r0, 3, (int)scales_f32); break;
            case 2: rows_block(blocks, scales, zeros, x, out, n, k, gs, b, r0, 2, (int)scales_f32); break;
            case 1: rows_block(blocks, scales, zeros, x, out, n, k, gs, b, r0, 1, (int)scales_f32); break;
            default: break;
        }
    }
}

/* w (k rows, ld apart) fp32: the dequantized weight (q - z) * s of blocks [b0, b1), block b0 at column 0. */
void gptq_int4_dequantize(const uint8_t *blocks, const void *scales, const uint8_t *zeros, float *w,
                          int64_t n, int64_t k, int64_t gs, int64_t b0, int64_t b1, int64_t ld,
                          int64_t scales_f32, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = blocks + b * k * 32;
        for (int64_t g0 = 0; g0 < k; g0 += gs) {
            __m512 s[4];
            for (int j = 0; j < 4; j++) s[j] = load_scales(scales, (g0 / gs) * n + b * 64 + 16 * j, scales_f32);
            const __m256i z_lo = _mm256_loadu_si256((const __m256i *)(zeros + (g0 / gs) * n + b * 64));
            const __m256i z_hi = _mm256_loadu_si256((const __m256i *)(zeros + (g0 / gs) * n + b * 64 + 32));
            for (int64_t i = g0; i < g0 + gs; i++) {
                __m512 q[4];
                unpack(blk + i * 32, z_lo, z_hi, q);
                float *row = w + i * ld + (b - b0) * 64;
                for (int j = 0; j < 4; j++) _mm512_storeu_ps(row + 16 * j, _mm512_mul_ps(q[j], s[j]));
            }
        }
    }
}
