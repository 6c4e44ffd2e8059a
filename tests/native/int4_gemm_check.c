/* Parity check of gptq_tools/runtime/kernels/csrc/int4_gemm.c on its own, for any build and any CPU (also an
 * aarch64 build under qemu-user): pack random 4-bit weights into the kernel's layout, run gptq_int4_gemm and
 * gptq_int4_dequantize, and compare with a plain scalar computation of x @ ((q - z) * s); then the same calls on
 * 3 threads (the pool: workers that spin, and workers that sleep between calls) must give the same bits.
 * Built by tests/test_runtime_native_c.py: cc <build flags> -I<csrc> int4_gemm_check.c. Prints
 * "ok <build> lanes=<L> cases=<n>" and exits 0, or prints the first mismatch and exits 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "int4_gemm.c"

static uint32_t state = 12345u;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state >> 8; }

/* fp16 bits of a random positive normal value between 2^-6 and 2 (exponent field 9..15, any mantissa). */
static uint16_t half_bits(void) { return (uint16_t)(((9 + next() % 7) << 10) | (next() % 1024)); }

static int check(int m, int blocks, int k, int gs, int scales_f32) {
    const int n = blocks * BLOCK, groups = k / gs;
    uint8_t *q = malloc((size_t)k * n), *zeros = malloc((size_t)groups * n);
    int32_t *packed = calloc((size_t)blocks * k * L, 4);
    float *scales32 = malloc(sizeof(float) * groups * n), *x = malloc(sizeof(float) * m * k);
    uint16_t *scales16 = malloc(2 * (size_t)groups * n);
    float *out = malloc(sizeof(float) * m * n), *w = malloc(sizeof(float) * k * n);
    for (int i = 0; i < k * n; i++) q[i] = (uint8_t)(next() % 16);
    for (int i = 0; i < groups * n; i++) {
        zeros[i] = (uint8_t)(next() % 16);
        scales16[i] = half_bits();
        scales32[i] = half_to_float(scales16[i]) * (1.0f + 1e-4f * (float)(next() % 7));
    }
    for (int i = 0; i < m * k; i++) x[i] = (float)((int)(next() % 2001) - 1000) / 997.0f;
    for (int b = 0; b < blocks; b++)
        for (int i = 0; i < k; i++)
            for (int l = 0; l < L; l++) {
                uint32_t word = 0;
                for (int j = 0; j < 8; j++) word |= (uint32_t)q[(size_t)i * n + b * BLOCK + l + L * j] << (4 * j);
                packed[((size_t)b * k + i) * L + l] = (int32_t)word;
            }
    const void *scales = scales_f32 ? (const void *)scales32 : (const void *)scales16;
    gptq_int4_gemm(packed, scales, zeros, x, out, m, n, n, k, gs, 0, blocks, scales_f32, 1);
    gptq_int4_dequantize(packed, scales, zeros, w, n, k, gs, 0, blocks, n, scales_f32, 1);
    int bad = 0;
    float *out3 = malloc(sizeof(float) * m * n), *w3 = malloc(sizeof(float) * k * n);
    for (int spin = 0; spin < 2 && !bad; spin++) {
        gptq_pool_set_spin(spin ? 1000000 : 0);
        for (int repeat = 0; repeat < 20 && !bad; repeat++) {
            memset(out3, 0xff, sizeof(float) * m * n);
            memset(w3, 0xff, sizeof(float) * k * n);
            gptq_int4_gemm(packed, scales, zeros, x, out3, m, n, n, k, gs, 0, blocks, scales_f32, 3);
            gptq_int4_dequantize(packed, scales, zeros, w3, n, k, gs, 0, blocks, n, scales_f32, 3);
            if (memcmp(out, out3, sizeof(float) * m * n) || memcmp(w, w3, sizeof(float) * k * n)) {
                printf("3 threads (spin %d) differ from 1 thread (m=%d)\n", spin, m);
                bad = 1;
            }
        }
    }
    free(out3); free(w3);
    for (int i = 0; i < k && !bad; i++)
        for (int c = 0; c < n; c++) {
            int g = i / gs;
            float s = scales_f32 ? scales32[g * n + c] : half_to_float(scales16[g * n + c]);
            float expected = (float)((int)q[(size_t)i * n + c] - (int)zeros[g * n + c]) * s;
            if (w[(size_t)i * n + c] != expected) {
                printf("dequantize mismatch at row %d column %d: %g != %g\n", i, c, w[(size_t)i * n + c], expected);
                bad = 1;
                break;
            }
        }
    for (int r = 0; r < m && !bad; r++)
        for (int c = 0; c < n; c++) {
            double sum = 0, scale = 0;
            for (int i = 0; i < k; i++) {
                int g = i / gs;
                double s = scales_f32 ? scales32[g * n + c] : half_to_float(scales16[g * n + c]);
                double term = (double)x[r * k + i] * ((int)q[(size_t)i * n + c] - (int)zeros[g * n + c]) * s;
                sum += term;
                scale += fabs(term);
            }
            if (fabs(out[r * n + c] - sum) > 1e-5 * scale + 1e-30) {
                printf("gemm mismatch (m=%d) at row %d column %d: %.9g != %.9g\n", m, r, c, out[r * n + c], sum);
                bad = 1;
                break;
            }
        }
    free(q); free(zeros); free(packed); free(scales32); free(x); free(scales16); free(out); free(w);
    return bad;
}

int main(void) {
    int cases = 0;
    for (int m = 1; m <= 9; m++)
        for (int scales_f32 = 0; scales_f32 < 2; scales_f32++) {
            if (check(m, 3, 96, 32, scales_f32) || check(m, 2, 64, 64, scales_f32)) return 1;
            cases += 2;
        }
    printf("ok %s lanes=%d cases=%d\n", gptq_int4_build, L, cases);
    return 0;
}
