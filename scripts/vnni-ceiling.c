// The int8 kernels' ceiling on this CPU, measured: the rate of `vpdpbusd`
// on 512-bit registers alone, and with the float steps a block of the packed
// kernels needs per 8 of them (a product dw·dy and a multiply-add, plus an
// int→float conversion), and with integer adds instead.
//
//   cc -O2 -march=native scripts/vnni-ceiling.c -o /tmp/vnni-ceiling && /tmp/vnni-ceiling
//
// docs/performance.md ("a sixth session") has the figures of the Zen 4.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// Eight independent accumulators (latency 4 needs at least 4 in flight).
#define DP8                                    \
    a0 = _mm512_dpbusd_epi32(a0, u, v);        \
    a1 = _mm512_dpbusd_epi32(a1, u, v);        \
    a2 = _mm512_dpbusd_epi32(a2, u, v);        \
    a3 = _mm512_dpbusd_epi32(a3, u, v);        \
    a4 = _mm512_dpbusd_epi32(a4, u, v);        \
    a5 = _mm512_dpbusd_epi32(a5, u, v);        \
    a6 = _mm512_dpbusd_epi32(a6, u, v);        \
    a7 = _mm512_dpbusd_epi32(a7, u, v);
// Keeps every value in a register and every operation in the loop.
#define KEEP                                                                   \
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4),   \
                     "+v"(a5), "+v"(a6), "+v"(a7), "+v"(f0), "+v"(f1), "+v"(ci));

int main(void) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
            a7 = a0, ci = _mm512_set1_epi32(7);
    __m512i u = _mm512_set1_epi8(3), v = _mm512_set1_epi8(5);
    __m512 f0 = _mm512_set1_ps(1), f1 = f0, g = _mm512_set1_ps(1.0000001f);
    const long m = 300000000;
    double t, s;
    long x = 0;
    t = now();
    for (long i = 0; i < m; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    s = now() - t;
    printf("clock (dependent adds)      %.2f GHz\n", 4.0 * m / s / 1e9);
    t = now();
    for (long i = 0; i < m; i++) { a0 = _mm512_dpbusd_epi32(a0, u, v); KEEP }
    s = now() - t;
    printf("vpdpbusd latency            %.2f ns\n", s / m * 1e9);
    t = now();
    for (long i = 0; i < m; i++) { DP8 KEEP }
    s = now() - t;
    printf("8 vpdpbusd                  %.1f G multiply-adds/s\n", 512.0 * m / s / 1e9);
    t = now();
    for (long i = 0; i < m; i++) { DP8 f0 = _mm512_fmadd_ps(f0, g, g); f1 = _mm512_mul_ps(f1, g); KEEP }
    s = now() - t;
    printf("8 vpdpbusd + fma + mul      %.1f G multiply-adds/s\n", 512.0 * m / s / 1e9);
    t = now();
    for (long i = 0; i < m; i++) {
        DP8 __m512 c = _mm512_cvtepi32_ps(ci);
        f0 = _mm512_fmadd_ps(c, g, f0);
        f1 = _mm512_mul_ps(f1, g);
        KEEP
    }
    s = now() - t;
    printf("8 vpdpbusd + cvt + fma + mul %.1f G multiply-adds/s\n", 512.0 * m / s / 1e9);
    t = now();
    for (long i = 0; i < m; i++) { DP8 ci = _mm512_add_epi32(ci, u); ci = _mm512_add_epi32(ci, v); KEEP }
    s = now() - t;
    printf("8 vpdpbusd + 2 vpaddd       %.1f G multiply-adds/s\n", 512.0 * m / s / 1e9);
    // (The results, so that nothing is optimized away.)
    __m512i all = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                   _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
    printf("(checksums %d %g %g %ld)\n", _mm512_reduce_add_epi32(_mm512_add_epi32(all, ci)),
           _mm512_reduce_add_ps(f0), _mm512_reduce_add_ps(f1), x);
    return 0;
}
