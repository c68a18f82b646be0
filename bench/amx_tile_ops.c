/* What the AMX tile unit costs on this machine: the ceiling of any tile kernel, graftlm's included.

    gcc -O2 bench/amx_tile_ops.c -o /tmp/amx_tile_ops && /tmp/amx_tile_ops

Times, on one core, each step of a tile kernel's inner loop in isolation and together: tile products
(TDPBF16PS, TDPBUSD) on registers already loaded, with their operands loaded from L1 (2 x 2 blocking:
four 1 KiB loads per four products), and the per-block sequence of graftlm's int8 tile kernel
(matmul_amx in graftlm/kernels/cpu/qkernels.c: load W and activation tiles, zero, one TDPBUSD of
32-value depth, store the 16 x 16 sums) with and without the vector work that scales a block's sums
into fp32 accumulators. Linux only (it asks the kernel for the tile state); exits where the CPU has
no AMX. BENCHMARKS.md quotes its output.
*/
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FN __attribute__((target("amx-tile,amx-int8,amx-bf16,avx512f,avx512bw,avx512vl,fma"), noinline))

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
    return s == 1.25f; /* keeps the accumulators live */
}
