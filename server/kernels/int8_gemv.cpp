// y[m, n] = s[n] * sum_k x[m, k] * q[n, k] + bias[n]: fp32 activations, int8 weights with one
// fp32 scale per output channel (weight-only int8, `--quant int8` on CPU; server/kernels/native.py).
//
// Why our own: at 1-8 rows a decode step streams every weight once, so the product should run
// at memory speed on one byte a weight. torch's `_weight_int8pack_mm` has no AVX2 fast path and
// fbgemm quantises the activations too. This is a plain dot-product kernel: int8 weights are
// widened to fp32 in registers and multiplied into fp32 accumulators, 8 lanes at a time. AVX2
// and FMA only: without them the build fails and the engine keeps torch's kernels (a scalar
// version would be slower than those).
//
// Layout (`sb_int8_pack`): outputs in blocks of 8; inside a block, for each group of 8 inputs,
// the 8 outputs' 8 int8 weights side by side: 64 bytes, one cache line. A block is then one
// sequential stream whatever the batch, which the hardware prefetcher follows at full speed
// (row-major weights read 8 rows at a time ran at a third of the bandwidth). The last N % 8
// outputs stay row-major. K must be a multiple of 8 (the caller checks).
//
// Batch invariance: every (row m, output n) pair is computed the same way whatever the batch
// size, the blocking or the thread count: one 8-lane accumulator fed k = 0, 8, 16, ... in order,
// the same horizontal sum, then `* s[n] + bias[n]`. Blocking only decides which pairs share a
// widened weight vector, never the order of a pair's own sums. Built with -ffp-contract=off so
// the compiler adds no fused multiply-adds of its own.
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <vector>
#if !(defined(__AVX2__) && defined(__FMA__))
#error "the native int8 kernels need AVX2 and FMA (-march=native on a CPU that has them)"
#endif
#include <immintrin.h>

namespace {

inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 fp32
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 widen8(const float* p) {  // float weights (the LoRA factors, `sb_f32_linear`)
    return _mm256_loadu_ps(p);
}

// NR outputs x BR activation rows (NR * BR <= 8 accumulators). `w` points at the first output's
// first 8 weights; consecutive groups of 8 inputs are `step` bytes apart (64 in a packed block,
// K in a row-major row). Writes y[b * ldy + r] for r < NR.
template <int NR, int BR, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t step, int64_t rstride, int64_t groups,
          const float* s, const float* bias, float* y, int64_t ldy) {
    float sum[NR][BR];
    __m256 acc[NR][BR];
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < groups; ++c) {
        __m256 xv[BR];
        _mm_prefetch(reinterpret_cast<const char*>(w + (c + 8) * step), _MM_HINT_T0);  // 8 groups ahead: measured best of 8/16/32
        for (int b = 0; b < BR; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + c * 8);
        for (int r = 0; r < NR; ++r) {
            const __m256 wv = widen8(w + c * step + r * rstride);
            for (int b = 0; b < BR; ++b) acc[r][b] = _mm256_fmadd_ps(xv[b], wv, acc[r][b]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) sum[r][b] = hsum8(acc[r][b]);
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) {
            const float v = sum[r][b] * s[r];
            y[b * ldy + r] = bias ? v + bias[r] : v;
        }
}

// NR outputs for all M rows, 4 rows at a time (then 3, 2, 1)
template <int NR, typename W>
void rows(const float* x, int64_t ldx, const W* w, int64_t step, int64_t rstride, int64_t groups,
          const float* s, const float* bias, float* y, int64_t ldy, int64_t M) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<NR, 4>(x + m * ldx, ldx, w, step, rstride, groups, s, bias, y + m * ldy, ldy);
    switch (M - m) {
        case 3: tile<NR, 3>(x + m * ldx, ldx, w, step, rstride, groups, s, bias, y + m * ldy, ldy); break;
        case 2: tile<NR, 2>(x + m * ldx, ldx, w, step, rstride, groups, s, bias, y + m * ldy, ldy); break;
        case 1: tile<NR, 1>(x + m * ldx, ldx, w, step, rstride, groups, s, bias, y + m * ldy, ldy); break;
        default: break;
    }
}

// one packed block of 8 outputs (at n0) for all M rows: 8 accumulators per tile
void block(const float* x, int64_t ldx, const int8_t* blk, int64_t groups, const float* s,
           const float* bias, float* y, int64_t ldy, int64_t M, int64_t n0) {
    const float* bb = bias ? bias + n0 : nullptr;
    if (M == 1) {
        rows<8>(x, ldx, blk, 64, 8, groups, s + n0, bb, y + n0, ldy, M);
    } else if (M == 2) {
        for (int r = 0; r < 8; r += 4)
            rows<4>(x, ldx, blk + r * 8, 64, 8, groups, s + n0 + r, bb ? bb + r : nullptr, y + n0 + r, ldy, M);
    } else {
        for (int r = 0; r < 8; r += 2)
            rows<2>(x, ldx, blk + r * 8, 64, 8, groups, s + n0 + r, bb ? bb + r : nullptr, y + n0 + r, ldy, M);
    }
}

// ---- int8 activations too (`--quant w8a8`) ----------------------------------------------------
// Each activation row is quantised on its own scale to 7 bits (|xq| <= 63, like fbgemm's
// `reduce_range`), the weights are stored as unsigned bytes u = q + 128, and AVX2's maddubs
// multiplies 32 (u, xq) pairs into 16 int16 sums of two: 255 * 63 * 2 = 32130 never saturates.
// The int32 dot product is exact, so its order cannot matter; sum(u * xq) - 128 * sum(xq) is
// sum(q * xq). Then y = dot * (sx[m] * s[n]) + bias[n] in that fixed float order: a row's result
// is its own, alone or batched. Layout (`sb_w8a8_pack`): blocks of 8 outputs, and in a block,
// per group of 32 inputs, the 8 outputs' 32 bytes side by side (256 bytes); the last N % 8
// outputs row-major. K % 32 == 0.

inline int32_t hsum8i(__m256i v) {
    __m128i lo = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0x4e));
    lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0xb1));
    return _mm_cvtsi128_si32(lo);
}

template <int NR, int BR>
void itile(const int8_t* xq, int64_t K, const uint8_t* w, int64_t step, int64_t rstride, int64_t groups,
           const int32_t* xsum, const float* sx, const float* s, const float* bias, float* y, int64_t ldy) {
    int32_t dot[NR][BR];
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[NR][BR];
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) acc[r][b] = _mm256_setzero_si256();
    for (int64_t c = 0; c < groups; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (c + 2) * step), _MM_HINT_T0);
        __m256i xv[BR];
        for (int b = 0; b < BR; ++b) xv[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * K + c * 32));
        for (int r = 0; r < NR; ++r) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * step + r * rstride));
            for (int b = 0; b < BR; ++b)
                acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv[b]), ones));
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) dot[r][b] = hsum8i(acc[r][b]);
    for (int r = 0; r < NR; ++r)
        for (int b = 0; b < BR; ++b) {
            const float v = static_cast<float>(dot[r][b] - 128 * xsum[b]) * (sx[b] * s[r]);
            y[b * ldy + r] = bias ? v + bias[r] : v;
        }
}

template <int NR>
void irows(const int8_t* xq, int64_t K, const uint8_t* w, int64_t step, int64_t rstride, int64_t groups,
           const int32_t* xsum, const float* sx, const float* s, const float* bias, float* y, int64_t ldy,
           int64_t M) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        itile<NR, 4>(xq + m * K, K, w, step, rstride, groups, xsum + m, sx + m, s, bias, y + m * ldy, ldy);
    switch (M - m) {
        case 3: itile<NR, 3>(xq + m * K, K, w, step, rstride, groups, xsum + m, sx + m, s, bias, y + m * ldy, ldy); break;
        case 2: itile<NR, 2>(xq + m * K, K, w, step, rstride, groups, xsum + m, sx + m, s, bias, y + m * ldy, ldy); break;
        case 1: itile<NR, 1>(xq + m * K, K, w, step, rstride, groups, xsum + m, sx + m, s, bias, y + m * ldy, ldy); break;
        default: break;
    }
}

void iblock(const int8_t* xq, int64_t K, const uint8_t* blk, int64_t groups, const int32_t* xsum,
            const float* sx, const float* s, const float* bias, float* y, int64_t ldy, int64_t M, int64_t n0) {
    const float* bb = bias ? bias + n0 : nullptr;
    if (M == 1) {
        irows<8>(xq, K, blk, 256, 32, groups, xsum, sx, s + n0, bb, y + n0, ldy, M);
    } else if (M == 2) {
        for (int r = 0; r < 8; r += 4)
            irows<4>(xq, K, blk + r * 32, 256, 32, groups, xsum, sx, s + n0 + r, bb ? bb + r : nullptr, y + n0 + r, ldy, M);
    } else {  // one row at a time over all 8 outputs: the block's full lines in order, then from L1
        for (int64_t m = 0; m < M; ++m)
            irows<8>(xq + m * K, K, blk, 256, 32, groups, xsum + m, sx + m, s + n0, bb, y + m * ldy + n0, ldy, 1);
    }
}

// blocks of 8 outputs, each group of G inputs of the 8 outputs side by side; the last N % 8
// outputs row-major; every byte q + offset (0 for int8, 128 for w8a8's unsigned weights)
template <int G, typename T>
void pack(const int8_t* q, T* packed, int64_t N, int64_t K, int offset) {
    const int64_t n8 = N - N % 8, groups = K / G;
    for (int64_t i = 0; i < n8 / 8; ++i)
        for (int64_t c = 0; c < groups; ++c)
            for (int r = 0; r < 8; ++r)
                for (int l = 0; l < G; ++l)
                    packed[((i * groups + c) * 8 + r) * G + l] = static_cast<T>(q[(i * 8 + r) * K + c * G + l] + offset);
    for (int64_t i = n8 * K; i < N * K; ++i) packed[i] = static_cast<T>(q[i] + offset);
}

}  // namespace

extern "C" {

// q [N, K] int8 row-major -> packed [N, K]: the first N - N % 8 outputs in blocks of 8 (above),
// the rest row-major after them. K % 8 == 0.
void sb_int8_pack(const int8_t* q, int8_t* packed, int64_t N, int64_t K) { pack<8>(q, packed, N, K, 0); }

// x [M, K] fp32 (row stride ldx), packed from sb_int8_pack, s [N] fp32, bias [N] fp32 or null,
// y [M, N] fp32 (row stride ldy). The blocks of 8 outputs are split across `threads`.
void sb_int8_linear(const float* x, int64_t ldx, const int8_t* packed, const float* s, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t nb = N / 8, groups = K / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < nb; ++i) block(x, ldx, packed + i * 8 * K, groups, s, bias, y, ldy, M, i * 8);
    for (int64_t n = nb * 8; n < N; ++n)  // the row-major tail: one output at a time
        rows<1>(x, ldx, packed + n * K, 8, 0, groups, s + n, bias ? bias + n : nullptr, y + n, ldy, M);
}

// q [N, K] int8 row-major -> the w8a8 layout (above), as unsigned bytes q + 128. K % 32 == 0.
void sb_w8a8_pack(const int8_t* q, uint8_t* packed, int64_t N, int64_t K) { pack<32>(q, packed, N, K, 128); }

// x [M, K] fp32 (row stride ldx) quantised per row to 7 bits here; packed from sb_w8a8_pack;
// s [N] fp32; bias [N] fp32 or null; y [M, N] fp32 (row stride ldy). A row holding NaN or inf
// comes out all NaN (its scale is undefined), and only that row.
void sb_w8a8_linear(const float* x, int64_t ldx, const uint8_t* packed, const float* s, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    std::vector<int8_t> xq(static_cast<size_t>(M * K));
    std::vector<int32_t> xsum(static_cast<size_t>(M));
    std::vector<float> sx(static_cast<size_t>(M));
    std::vector<char> bad(static_cast<size_t>(M), 0);
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * ldx;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            const float a = fabsf(row[k]);
            if (!(a <= 3.4028234663852886e38f)) bad[m] = 1;  // NaN or inf
            else if (a > amax) amax = a;
        }
        const float inv = amax > 0.0f ? 63.0f / amax : 0.0f;
        sx[m] = amax / 63.0f;
        int32_t t = 0;
        for (int64_t k = 0; k < K; ++k) {
            float v = nearbyintf(row[k] * inv);
            v = v > 63.0f ? 63.0f : (v < -63.0f ? -63.0f : v);
            xq[m * K + k] = bad[m] ? 0 : static_cast<int8_t>(v);
            t += xq[m * K + k];
        }
        xsum[m] = t;
    }
    const int64_t nb = N / 8, groups = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < nb; ++i)
        iblock(xq.data(), K, packed + i * 8 * K, groups, xsum.data(), sx.data(), s, bias, y, ldy, M, i * 8);
    for (int64_t n = nb * 8; n < N; ++n)
        irows<1>(xq.data(), K, packed + n * K, 32, 0, groups, xsum.data(), sx.data(), s + n, bias ? bias + n : nullptr,
                 y + n, ldy, M);
    for (int64_t m = 0; m < M; ++m)
        if (bad[m])
            for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = NAN;
}

// ---- the LoRA products beside the int8 base (fp32 factors, `--quant` only) --------------------
// h [M, R] = x [M, K] · a_tᵀ, a_t [R, K] fp32 row-major (the stacked A, transposed): the tiles
// above over float weights, 8 rows of a_t read side by side; K % 8 == 0. Same fixed order per
// (row, output) as the int8 products, so a row's h is its own.
void sb_f32_linear(const float* x, int64_t ldx, const float* a_t, float* h, int64_t M, int64_t R, int64_t K,
                   int threads) {
    const int64_t nb = R / 8, groups = K / 8;
    const std::vector<float> unit(static_cast<size_t>(R), 1.0f);  // no scale
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < nb; ++i)
        rows<8>(x, ldx, a_t + i * 8 * K, 8, K, groups, unit.data() + i * 8, nullptr, h + i * 8, R, M);
    for (int64_t n = nb * 8; n < R; ++n)
        rows<1>(x, ldx, a_t + n * K, 8, 0, groups, unit.data() + n, nullptr, h + n, R, M);
}

// y [M, N] += h [M, R] · b [R, N], b row-major: per row, 64 output columns at a time held in 8
// accumulators while r runs 0..R-1 in order, then added to y once (the order `y + h·b` has).
// Column blocks split across threads; the last N % 64 columns one at a time in the same order.
void sb_f32_addmm(const float* h, const float* b, float* y, int64_t ldy, int64_t M, int64_t R, int64_t N,
                  int threads) {
    const int64_t nc = N / 64;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t c = 0; c < nc; ++c)
        for (int64_t m = 0; m < M; ++m) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t r = 0; r < R; ++r) {
                const __m256 hv = _mm256_set1_ps(h[m * R + r]);
                const float* br = b + r * N + c * 64;
                for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(hv, _mm256_loadu_ps(br + 8 * j), acc[j]);
            }
            float* yr = y + m * ldy + c * 64;
            for (int j = 0; j < 8; ++j) _mm256_storeu_ps(yr + 8 * j, _mm256_add_ps(_mm256_loadu_ps(yr + 8 * j), acc[j]));
        }
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = nc * 64; j < N; ++j) {
            float t = 0.0f;
            for (int64_t r = 0; r < R; ++r) t = fmaf(h[m * R + r], b[r * N + j], t);
            y[m * ldy + j] += t;
        }
}

}  // extern "C"
