/* What the AMX tile unit costs on this machine: the ceiling of any tile kernel, graftlm's included.

    gcc -O2 -pthread bench/amx_tile_ops.c -o /tmp/amx_tile_ops && /tmp/amx_tile_ops

Times, on one core, each step of a tile kernel's inner loop in isolation and together: tile products
(TDPBF16PS, TDPBUSD) on registers already loaded, with their operands loaded from L1 (2 x 2 blocking:
four 1 KiB loads per four products), and the per-block sequence of graftlm's int8 tile kernel
(matmul_amx in graftlm/kernels/cpu/qkernels.c: load W and activation tiles, zero, one TDPBUSD of
32-value depth, store the 16 x 16 sums) with and without the vector work that scales a block's sums
into fp32 accumulators. Then whether two cores' tile units work at once: the same number of tile
products on registers on one thread, then on two threads together, and for contrast a loop of
AVX-512 VNNI dot products (the instructions of llama.cpp's CPU kernels) the same two ways. Linux
only (it asks the kernel for the tile state); exits where the CPU has no AMX. BENCHMARKS.md quotes
its output.
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FN __attribute__((target("amx-tile,amx-int8,amx-bf16,avx512f,avx512bw,avx512vl,avx512vnni,fma"), noinline))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} cfg_t;

static char buf[1 << 20] __attribute__((aligned(64)));
static int32_t c32[256] __attribute__((aligned(64)));
static float D[16 * 64], M[16 * 64], dx[64 * 16], sx[64 * 16];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* the int8 kernel's scaling of one block's 16 x 16 sums (unsigned types: with the min term) */
FN static void scale_block(__m512 *acc, const int32_t *c, int b) {
    const __m512 vdx = _mm512_loadu_ps(dx + b * 16), vsx = _mm512_loadu_ps(sx + b * 16);
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) {
        __m512 ddx = _mm512_mul_ps(vdx, _mm512_set1_ps(D[r * 64 + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + r * 16)), ddx, acc[r]);
        acc[r] = _mm512_fmadd_ps(vsx, _mm512_set1_ps(M[r * 64 + b]), acc[r]);
    }
}

FN static void config(int int8_layout) {
    cfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    if (int8_layout) cfg.colsb[4] = 32, cfg.rows[5] = 8; /* W: 16 rows x 32 bytes; x: 8 rows x 64 */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

/* A fixed amount of work for one thread: tile products on registers, or AVX-512 VNNI dot products
   (eight independent accumulators, enough to keep the unit busy). */
FN static void *tile_work(void *arg) {
    (void)arg;
    cfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg); /* per thread */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3); /* (operand tiles 4-7 hold whatever they hold) */
    for (long i = 0; i < 5000000; i++) {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c32, 64);
    _tile_release();
    return NULL;
}

FN static void *vnni_work(void *arg) {
    __m512i a[8];
    const __m512i u = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2);
    for (int j = 0; j < 8; j++) a[j] = _mm512_set1_epi32(j);
    for (long i = 0; i < 50000000; i++)
        for (int j = 0; j < 8; j++) a[j] = _mm512_dpbusd_epi32(a[j], u, w);
    int r = 0;
    for (int j = 0; j < 8; j++) r += _mm512_reduce_add_epi32(a[j]);
    *(int *)arg = r;
    return NULL;
}

/* seconds for `threads` threads to each run `work` once, together */
static double together(void *(*work)(void *), int threads) {
    pthread_t th[2];
    int sink[2];
    double t = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, work, &sink[i]);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    return now() - t;
}

FN int main(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 24) & 1) || !((d >> 25) & 1) || !((d >> 22) & 1) ||
        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        printf("no AMX (or no tile permission) here\n");
        return 0;
    }
    memset(buf, 1, sizeof buf);
    for (int i = 0; i < 1024; i++) D[i] = 1e-3f, M[i] = 1e-4f, dx[i] = 0.5f, sx[i] = 0.1f;
    const long n = 2000000;
    double t, e;

    config(0);
    /* four products on loaded registers, 2 x 2 (tiles 0-3 += 4|5 x 6|7) */
#define ON_REGISTERS(OP, NAME, UNIT, DEPTH)                                                                   \
    t = now();                                                                                                \
    for (long i = 0; i < n; i++) {                                                                            \
        OP(0, 4, 6);                                                                                          \
        OP(1, 4, 7);                                                                                          \
        OP(2, 5, 6);                                                                                          \
        OP(3, 5, 7);                                                                                          \
    }                                                                                                         \
    e = now() - t;                                                                                            \
    printf(NAME ", operands in registers: %.2f ns a product (%.0f " UNIT ")\n", e / n / 4 * 1e9,              \
           n * 4.0 * 16 * 16 * (DEPTH) * 2 / e / 1e9);
    ON_REGISTERS(_tile_dpbf16ps, "TDPBF16PS", "GFLOP/s", 32)
    ON_REGISTERS(_tile_dpbusd, "TDPBUSD", "GOPS", 64)
    t = now();
    for (long i = 0; i < n; i++) {
        const int o = (int)(i & 7) * 1024;
        _tile_loadd(4, buf + o, 64);
        _tile_loadd(6, buf + 8192 + o, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, buf + 16384 + o, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, buf + 24576 + o, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    e = now() - t;
    printf("TDPBF16PS, 2x2 blocked, operands loaded from L1: %.2f ns a product (%.0f GFLOP/s)\n",
           e / n / 4 * 1e9, n * 4.0 * 16 * 16 * 32 * 2 / e / 1e9);
    _tile_release();

    config(1);
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    /* one block of the int8 kernel: its W tile (16 rows, 32 bytes, rows 2 KiB apart) and activation tile */
#define BLOCK_LOADS_PRODUCT                                                                                   \
    const int blk = (int)(i & 63);                                                                            \
    _tile_loadd(4, buf + blk * 32, 2048);                                                                     \
    _tile_loadd(5, buf + 131072 + blk * 512, 64);
#define TIMED(LABEL, BODY)                                                                                    \
    t = now();                                                                                                \
    for (long i = 0; i < n; i++) {                                                                            \
        BODY                                                                                                  \
    }                                                                                                         \
    e = now() - t;                                                                                            \
    printf(LABEL "%.2f ns\n", e / n * 1e9);
    TIMED("int8 kernel block: loads + product:          ", BLOCK_LOADS_PRODUCT _tile_dpbusd(0, 4, 5);)
    TIMED("  + zero and store the sums:                 ",
          BLOCK_LOADS_PRODUCT _tile_zero(0); _tile_dpbusd(0, 4, 5); _tile_stored(0, c32, 64);)
    TIMED("  the vector scaling alone:                  ", scale_block(acc, c32, (int)(i & 63));)
    TIMED("  all of it, as matmul_amx runs a block:     ",
          BLOCK_LOADS_PRODUCT _tile_zero(0); _tile_dpbusd(0, 4, 5); _tile_stored(0, c32, 64);
          scale_block(acc, c32, blk);)
    printf("  (that last figure is %.0f GOPS)\n", 16.0 * 16 * 32 * 2 / (e / n) / 1e9);
    float s = 0;
    for (int r = 0; r < 16; r++) s += _mm512_reduce_add_ps(acc[r]);
    _tile_release();

    /* Two cores at once: the same work per thread, so equal times mean the two run fully in parallel. */
    printf("\nthe same work on each thread, one thread then two at once (equal times: they scale):\n");
    for (int round = 0; round < 3; round++) {
        double t1 = together(tile_work, 1), t2 = together(tile_work, 2);
        double v1 = together(vnni_work, 1), v2 = together(vnni_work, 2);
        printf("  tile products: %.3f s, two threads %.3f s (%.2fx the time); "
               "AVX-512 VNNI: %.3f s, two threads %.3f s (%.2fx)\n",
               t1, t2, t2 / t1, v1, v2, v2 / v1);
    }
    return s == 1.25f; /* keeps the accumulators live */
}
