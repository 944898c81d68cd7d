// Token log-probs and entropy straight from hidden states and the LM head: the C++ epilogues.
//
// The logits z = (hidden @ weight^T + bias) / temperature never exist in full. rlkern/ops/
// linear_logprobs.py cuts tokens x vocabulary into tiles, computes each logits tile with one ATen
// matmul (MKL sgemm for fp32, oneDNN/AMX for bf16/fp16) into a preallocated buffer, and hands it
// to the two kernels here:
//
// lm_fold, the forward epilogue: the online-softmax recurrence of csrc/logits.cpp carried across
// tiles in per-token state
//   m = running max of z,  S = sum e^{z-m},  T = sum e^{z-m} (z-m),  z_y = the label's logit,
//   and, when asked for, Q = sum e^{2(z-m)},
// from which the caller forms lse = m + log S, H = log S - T / S, logp = z_y - lse and
// sum_v p_v^2 = Q / S^2. The inverse temperature is a scalar or one per token (row).
//
// lm_grad, the backward epilogue: overwrites a recomputed tile with d logits, using the
// full-vocabulary lse and H (so a vocabulary shard gets the gradient of the global softmax):
//   d z_j = g (1[j=y] - p_j) - h p_j (z_j - lse + H),   p_j = e^{z_j - lse},   d x = d z / temp.
// The caller then accumulates d hidden += d x @ W_tile and d W_tile += d x^T @ hidden_tile.
//
// lm_logits, the tile GEMM itself (see there for why not ATen's matmul): fp32 logits in a fixed
// summation order, so that a token's log-prob never depends on its batch or the thread count.
//
// Non-finite logits: a NaN or +inf logit makes its token's m, S and T NaN (so lse, entropy and
// log-prob are NaN, and so is the gradient); -inf is a banned token. vmax alone would keep or drop
// a NaN depending on operand order, so the max pass tracks "every logit < +inf" explicitly.
//
// Labels are global vocabulary ids; a tile covers ids [vocab_start, vocab_start + v).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RLKERN_HAVE_AMX 1
#endif

#include "lm_head.h"
#include "dispatch.h"
#include "simd.h"

namespace rlkern {
namespace {

// z = (x + b) * inv_temp for 16 logits; b is the fp32 bias slice, or nullptr for no bias.
template <typename T>
RLKERN_INLINE vfloat scaled16(const T* x, const float* b, vfloat vinv) {
  return b != nullptr ? (load16(x) + load16(b)) * vinv : load16(x) * vinv;
}

// The same for the last n < 16 logits of a row; padding lanes are -inf, so they neither raise the
// max nor add to the sums.
template <typename T>
RLKERN_INLINE vfloat scaled_tail(const T* x, const float* b, int64_t n, vfloat vinv) {
  const vfloat xv = load_tail(x, n, -kInf);
  return b != nullptr ? (xv + load_tail(b, n, 0.f)) * vinv : xv * vinv;
}

RLKERN_INLINE const float* offset(const float* b, int64_t j) { return b != nullptr ? b + j : nullptr; }

// Adds e = exp(d) to vs and, for entropy, e d to vt, d = z - m <= 0. d is clamped at -88 in the
// product so that a -inf logit (a banning bias) adds e d ~ -1e-36, never 0 * -inf = NaN.
// With kSumP2 also e^2 to vq (Q = sum e^{2d}: p^2 S^2; e^2 underflows to 0 below d ~ -44, where
// p^2 < 1e-38 S^-2 adds nothing to a sum >= 1 / V).
template <bool kEntropy, bool kSumP2>
RLKERN_INLINE void add_exp(vfloat d, vfloat& vs, vfloat& vt, vfloat& vq) {
  const vfloat e = vexp_nonpos(d);
  vs += e;
  if constexpr (kEntropy) vt += e * vmax(d, splat(-88.f));
  if constexpr (kSumP2) vq += e * e;
}

// Folds one tile row (len logits) into its token's running (m, S, T, Q). The row is read twice: once
// for its max, then (from L1/L2: a tile row is a few KiB) for the exponentials.
template <typename T, bool kEntropy, bool kSumP2>
RLKERN_INLINE void fold_row(const T* x, const float* b, int64_t len, float inv_temp, float& m, float& S,
                            float& Tsum, float& Q) {
  if (m != m) return;  // an earlier tile held a NaN or +inf logit: the token stays NaN
  const vfloat vinv = splat(inv_temp);
  const int64_t full = len - len % kLanes;
  vfloat vm = splat(-kInf);
  vint finite_or_banned = splat(0.f) == splat(0.f);  // all lanes true; false where z is NaN or +inf
  for (int64_t j = 0; j < full; j += kLanes) {
    const vfloat z = scaled16(x + j, offset(b, j), vinv);
    vm = vmax(vm, z);
    finite_or_banned &= z < splat(kInf);
  }
  if (full < len) {
    const vfloat z = scaled_tail(x + full, offset(b, full), len - full, vinv);  // padding lanes are -inf
    vm = vmax(vm, z);
    finite_or_banned &= z < splat(kInf);
  }
  int32_t ok[kLanes];
  std::memcpy(ok, &finite_or_banned, sizeof(ok));
  for (int i = 0; i < kLanes; ++i) {
    if (ok[i] == 0) {
      m = S = Tsum = Q = std::numeric_limits<float>::quiet_NaN();
      return;
    }
  }
  const float tile_max = hmax(vm);
  if (tile_max > m) {
    if (S > 0.f) {  // move the sums from the old max to the new one: S' = c S, T' = c (T + (m - m') S)
      const float c = std::exp(m - tile_max);
      Tsum = c * (Tsum + (m - tile_max) * S);
      S *= c;
      if constexpr (kSumP2) Q *= c * c;
    }
    m = tile_max;
  }
  if (m == -kInf) return;  // every logit so far is -inf (a bias banning them all)
  const vfloat vmz = splat(m);
  // Two independent accumulator pairs hide the latency of the vector adds.
  vfloat vs0 = splat(0.f), vt0 = splat(0.f), vq0 = splat(0.f), vs1 = splat(0.f), vt1 = splat(0.f),
         vq1 = splat(0.f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= full; j += 2 * kLanes) {
    add_exp<kEntropy, kSumP2>(scaled16(x + j, offset(b, j), vinv) - vmz, vs0, vt0, vq0);
    add_exp<kEntropy, kSumP2>(scaled16(x + j + kLanes, offset(b, j + kLanes), vinv) - vmz, vs1, vt1, vq1);
  }
  if (j < full) add_exp<kEntropy, kSumP2>(scaled16(x + j, offset(b, j), vinv) - vmz, vs0, vt0, vq0);
  if (full < len) {
    add_exp<kEntropy, kSumP2>(scaled_tail(x + full, offset(b, full), len - full, vinv) - vmz, vs1, vt1, vq1);
  }
  S += hsum(vs0 + vs1);
  if constexpr (kEntropy) Tsum += hsum(vt0 + vt1);
  if constexpr (kSumP2) Q += hsum(vq0 + vq1);
}

struct TileGeometry {
  int64_t ld;           // row stride of the tile (elements)
  int64_t len;          // vocabulary entries per row
  int64_t vocab_start;  // global id of column 0
};

// Per-row pointers of a fold, indexed by tile row. q (Q, for sum p^2) and inv (a per-row inverse
// temperature, replacing the scalar) are nullptr when absent.
struct FoldState {
  float* m;
  float* s;
  float* t;
  float* zy;
  float* q = nullptr;
  const float* inv = nullptr;
};

template <typename T>
RLKERN_INLINE void fold_rows(int64_t begin, int64_t end, const T* tile, const TileGeometry& g, const float* bias,
                             const int64_t* labels, int64_t ignore_index, float inv_temp, bool want_entropy,
                             const FoldState& st) {
  float no_q = 0.f;
  for (int64_t i = begin; i < end; ++i) {
    const T* x = tile + i * g.ld;
    const float it = st.inv != nullptr ? st.inv[i] : inv_temp;
    float& q = st.q != nullptr ? st.q[i] : no_q;
    if (want_entropy) {
      if (st.q != nullptr) {
        fold_row<T, true, true>(x, bias, g.len, it, st.m[i], st.s[i], st.t[i], q);
      } else {
        fold_row<T, true, false>(x, bias, g.len, it, st.m[i], st.s[i], st.t[i], q);
      }
    } else if (st.q != nullptr) {
      fold_row<T, false, true>(x, bias, g.len, it, st.m[i], st.s[i], st.t[i], q);
    } else {
      fold_row<T, false, false>(x, bias, g.len, it, st.m[i], st.s[i], st.t[i], q);
    }
    const int64_t j = labels[i] - g.vocab_start;
    if (labels[i] != ignore_index && j >= 0 && j < g.len) {
      st.zy[i] = (static_cast<float>(x[j]) + (bias != nullptr ? bias[j] : 0.f)) * it;
    }
  }
}

struct GradRow {
  vfloat inv_temp, lse, g, h, ent;
};

// d x for 16 logits without the label's g 1[j=y] term: -p (g + h (z - lse + H)) / temp.
RLKERN_INLINE vfloat grad16(vfloat z, const GradRow& c) {
  const vfloat d = z - c.lse;
  const vfloat p = vexp_nonpos(d);
  const vfloat dz = -(p * (c.g + c.h * (d + c.ent)));
  // Below ln(FLT_MIN) (and for -inf logits, where d + H is -inf) the gradient is exactly 0; a NaN
  // (from a NaN lse, i.e. a NaN or +inf logit in the row) fails the test and stays NaN.
  return d <= splat(-87.33654f) ? splat(0.f) : dz * c.inv_temp;
}

// Per-row inputs of lm_grad, indexed by tile row (nullptr when absent; lse is always there). inv: a
// per-row inverse temperature replacing the scalar.
struct GradState {
  const float* grad_logp;
  const float* grad_ent;
  const float* lse;
  const float* ent;
  const float* inv = nullptr;
};

template <typename T>
RLKERN_INLINE void grad_rows(int64_t begin, int64_t end, T* tile, const TileGeometry& g, const float* bias,
                             const int64_t* labels, int64_t ignore_index, float inv_temp_all, const GradState& st) {
  const float* grad_logp = st.grad_logp;
  const float* grad_ent = st.grad_ent;
  const float* lse = st.lse;
  const float* ent = st.ent;
  for (int64_t i = begin; i < end; ++i) {
    T* x = tile + i * g.ld;
    const float inv_temp = st.inv != nullptr ? st.inv[i] : inv_temp_all;
    const vfloat vinv = splat(inv_temp);
    if (lse[i] == -kInf) {  // every logit of the token is -inf: no distribution, no gradient
      for (int64_t j = 0; j < g.len; ++j) x[j] = T(0.f);
      continue;
    }
    const bool has_label = labels[i] != ignore_index;
    const int64_t jy = labels[i] - g.vocab_start;
    const bool label_here = has_label && jy >= 0 && jy < g.len;
    const float gl = (grad_logp != nullptr && has_label) ? grad_logp[i] : 0.f;
    const float gh = grad_ent != nullptr ? grad_ent[i] : 0.f;
    const float h = ent != nullptr ? ent[i] : 0.f;
    // The label's logit is read before the row is overwritten with its gradient.
    const float zy = label_here ? (static_cast<float>(x[jy]) + (bias != nullptr ? bias[jy] : 0.f)) * inv_temp : 0.f;
    const GradRow c{vinv, splat(lse[i]), splat(gl), splat(gh), splat(h)};
    const int64_t full = g.len - g.len % kLanes;
    for (int64_t j = 0; j < full; j += kLanes) store16(x + j, grad16(scaled16(x + j, offset(bias, j), vinv), c));
    if (full < g.len) {
      const int64_t n = g.len - full;
      store_tail(x + full, grad16(scaled_tail(x + full, offset(bias, full), n, vinv), c), n);
    }
    if (label_here) {
      const float d = zy - lse[i];
      const float p = std::exp(d);
      const float entropy_term = p > 0.f ? gh * p * (d + h) : 0.f;
      x[jy] = T((gl * (1.f - p) - entropy_term) * inv_temp);
    }
  }
}

// ---- lm_logits: out[i, j] = sum_k hidden[i, k] weight[j, k] in fp32 --------------------------------
// Why not ATen's matmul: MKL's sgemm picks its blocking (and, for one or a few rows, a gemv path)
// from the matrix sizes and the thread count, so the same token's logits differed in the last bit
// between a batch of 1, 7, 64 or 299 rows (measured: only the largest sizes agreed), which made
// linear_logprobs depend on the micro-batch (verl #6280). And bf16/fp16 GEMMs round their output to
// the input dtype: fp16 logits near 3e4 are 16 apart, 5 nats of error. Here each logit is one fp32
// sum over k = 0, 1, ..., H-1 in order, c = c + h_k w_k (one fused op where the CPU has FMA), and
// the blocking below only decides which logits are computed together, never that order: rows,
// columns and threads around a logit cannot change its bits. Layout: BLIS-style register blocks of
// kBlockRows tokens x kPanel vocabulary ids; the weight panel slice is packed transposed (fp32) for
// kDepth steps of k at a time so that it stays in L1, and the partial sums wait in `out` between
// slices (a store and a reload do not change a float).
constexpr int kPanel = 2 * kLanes;  // vocabulary ids per packed panel: two vectors
constexpr int kBlockRows = 12;      // tokens per register block: 24 accumulators + 2 panel vectors + 1 broadcast (of 32 zmm)
// k per slice: 16 KiB of panel + 6 KiB of packed rows, well inside L1 (48 KiB). 256 (32 + 12 KiB)
// filled L1 and the streamed rows evicted the panel: the fp32 forward at N=1024, H=512, V=32768 (one
// thread) took 1.1x as long. The slice size never changes a logit's bits (see above).
constexpr int64_t kDepth = 128;
constexpr int64_t kRowsPerTask = 16 * kBlockRows;

// Tasks per thread hand-off for tasks of `work` multiply-adds (or copies) each: at least ~1M, so a
// small call runs on the calling thread instead of paying a thread wake-up and barrier (tens of us,
// and a scheduler quantum when the other core is busy) for microseconds of work.
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(work, 1)); }

// x in every lane as one vbroadcastss (splat's 0 + x adds a scalar add per row and k here).
RLKERN_INLINE vfloat broadcast(float x) {
  const vfloat v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

// The R x kPanel block of C that a logits block accumulates into: zeros for the first k slice,
// else C's current values (a partial panel of `cols` < kPanel columns through the tail helpers).
template <int R>
RLKERN_INLINE void load_block(vfloat (&acc)[R][2], const float* c, int64_t ldc, int64_t cols, bool first) {
  for (int i = 0; i < R; ++i) {
    if (first) {
      acc[i][0] = acc[i][1] = splat(0.f);
    } else if (cols == kPanel) {
      acc[i][0] = load16(c + i * ldc);
      acc[i][1] = load16(c + i * ldc + kLanes);
    } else {
      acc[i][0] = load_tail(c + i * ldc, std::min<int64_t>(cols, kLanes), 0.f);
      acc[i][1] = cols > kLanes ? load_tail(c + i * ldc + kLanes, cols - kLanes, 0.f) : splat(0.f);
    }
  }
}

template <int R>
RLKERN_INLINE void store_block(const vfloat (&acc)[R][2], float* c, int64_t ldc, int64_t cols) {
  for (int i = 0; i < R; ++i) {
    if (cols == kPanel) {
      store16(c + i * ldc, acc[i][0]);
      store16(c + i * ldc + kLanes, acc[i][1]);
    } else {
      store_tail(c + i * ldc, acc[i][0], std::min<int64_t>(cols, kLanes));
      if (cols > kLanes) store_tail(c + i * ldc + kLanes, acc[i][1], cols - kLanes);
    }
  }
}

// One register block of R <= kBlockRows tokens x kPanel ids over `depth` steps of k, its rows packed
// k-major (pa[k * kBlockRows + i] = hidden[row + i][k], see pack_rows): the broadcasts read one 48-byte
// line per k instead of R rows 4 KiB-aliased in L1. A block of fewer rows (a tile's last) reads the
// same stride and leaves the padding lanes alone: each logit's arithmetic is the same for every R.
template <int R>
RLKERN_INLINE void logits_block(const float* pa, const float* panel, int64_t depth, float* c, int64_t ldc,
                                int64_t cols, bool first) {
  vfloat acc[R][2];
  load_block<R>(acc, c, ldc, cols, first);
  for (int64_t k = 0; k < depth; ++k) {
    const vfloat b0 = load16(panel + k * kPanel), b1 = load16(panel + k * kPanel + kLanes);
    for (int i = 0; i < R; ++i) {
      const vfloat x = broadcast(pa[k * kBlockRows + i]);
      acc[i][0] += x * b0;
      acc[i][1] += x * b1;
    }
  }
  store_block<R>(acc, c, ldc, cols);
}

struct LogitsGeometry {
  int64_t rows, cols, depth;  // tokens, vocabulary ids, hidden size
  int64_t ldo;                // row stride of out
};

// weight [v, H] fp32 -> panels of kPanel ids, k-major: packed[p][k][j] = weight[kPanel p + j][k], 0 past
// v. Packed once per call (the old per-task packing re-packed each panel for every 96 rows, as many
// cycles as the FMAs themselves: 0.61x MKL); 32 sequential read streams per panel.
void pack_panels_f32(const float* w, int64_t v, int64_t h, float* packed) {
  const int64_t panels = (v + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, grain_for(kPanel * h), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      float* out = packed + p * kPanel * h;
      const int64_t cols = std::min<int64_t>(kPanel, v - p * kPanel);
      const float* rows = w + p * kPanel * h;
      for (int64_t k0 = 0; k0 < h; k0 += 64) {
        const int64_t k1 = std::min<int64_t>(h, k0 + 64);
        for (int64_t j = 0; j < kPanel; ++j) {
          if (j < cols) {
            for (int64_t k = k0; k < k1; ++k) out[k * kPanel + j] = rows[j * h + k];
          } else {
            for (int64_t k = k0; k < k1; ++k) out[k * kPanel + j] = 0.f;
          }
        }
      }
    }
  });
}

constexpr int64_t kPanelsPerTask = 16;  // 512 vocabulary ids: 1 MiB of packed weight at H = 512 (L2)

// Rows per token tile once packed: whole register blocks, the last one zero-padded.
inline int64_t packed_tile_rows(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows * kBlockRows; }

// hidden [n, H] (fp32, or bf16 / fp16 widened exactly) -> the rows operand of logits_block, packed
// once per call: token tile t (rows [t tile, +tile)) starts at pa + t packed_tile_rows(tile) H, and its
// block of rows [r, r + kBlockRows) (r from the tile's start) at + r H, as pa[k kBlockRows + i] =
// hidden[r + i][k], rows past the tile 0. Packing inside each (vocabulary tile, task), as before, re-
// packed all N rows for every 512 vocabulary ids: at N=2048, H=1024, V=151936 (fp32, one thread) the
// forward (GEMM and fold) took 1.22-1.31x as long as MKL's GEMM alone on the same tiles, 1.12-1.18x now.
template <typename T>
void pack_rows(const T* hidden, int64_t n, int64_t h, int64_t tile, float* pa) {
  const int64_t per_tile = packed_tile_rows(tile) / kBlockRows, tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles * per_tile, grain_for(kBlockRows * h), [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk / per_tile * tile, r = n0 + blk % per_tile * kBlockRows;
      const int64_t live = std::max<int64_t>(0, std::min<int64_t>(kBlockRows, std::min(n, n0 + tile) - r));
      float* dst = pa + blk * kBlockRows * h;
      for (int64_t k0 = 0; k0 < h; k0 += 64) {  // 64 k at a time: 12 rows x 256 B of source and 3 KiB of pa in L1
        const int64_t k1 = std::min<int64_t>(h, k0 + 64);
        for (int64_t i = 0; i < live; ++i) {
          const T* src = hidden + (r + i) * h;
          for (int64_t k = k0; k < k1; ++k) dst[k * kBlockRows + i] = static_cast<float>(src[k]);
        }
        for (int64_t i = live; i < kBlockRows; ++i) {
          for (int64_t k = k0; k < k1; ++k) dst[k * kBlockRows + i] = 0.f;
        }
      }
    }
  });
}

// Tasks [begin, end) of (panel group, row chunk) pairs, group-major: task t covers panels
// [16 (t / chunks), +16) and rows [kRowsPerTask (t % chunks), +kRowsPerTask). A thread's consecutive
// tasks share the group's packed weight (L2) while the rows (packed by pack_rows, pa: this tile's)
// stream.
RLKERN_INLINE void logits_tasks(int64_t begin, int64_t end, const float* pa, const float* packed,
                                const LogitsGeometry& g, float* out) {
  const int64_t chunks = (g.rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t panels = (g.cols + kPanel - 1) / kPanel;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p0 = (t / chunks) * kPanelsPerTask, p1 = std::min(panels, p0 + kPanelsPerTask);
    const int64_t row0 = (t % chunks) * kRowsPerTask;
    const int64_t row_end = std::min(g.rows, row0 + kRowsPerTask);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t col0 = p * kPanel;
      const int64_t cols = std::min<int64_t>(kPanel, g.cols - col0);
      for (int64_t k0 = 0; k0 < g.depth; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, g.depth - k0);
        const float* panel = packed + p * kPanel * g.depth + k0 * kPanel;
        const bool first = k0 == 0;
        for (int64_t i = row0; i < row_end; i += kBlockRows) {
          const float* a = pa + i * g.depth + k0 * kBlockRows;
          float* c = out + i * g.ldo + col0;
          switch (std::min<int64_t>(kBlockRows, row_end - i)) {  // the same per-logit arithmetic on fewer rows
            case kBlockRows: logits_block<kBlockRows>(a, panel, depth, c, g.ldo, cols, first); break;
            case 11: logits_block<11>(a, panel, depth, c, g.ldo, cols, first); break;
            case 10: logits_block<10>(a, panel, depth, c, g.ldo, cols, first); break;
            case 9: logits_block<9>(a, panel, depth, c, g.ldo, cols, first); break;
            case 8: logits_block<8>(a, panel, depth, c, g.ldo, cols, first); break;
            case 7: logits_block<7>(a, panel, depth, c, g.ldo, cols, first); break;
            case 6: logits_block<6>(a, panel, depth, c, g.ldo, cols, first); break;
            case 5: logits_block<5>(a, panel, depth, c, g.ldo, cols, first); break;
            case 4: logits_block<4>(a, panel, depth, c, g.ldo, cols, first); break;
            case 3: logits_block<3>(a, panel, depth, c, g.ldo, cols, first); break;
            case 2: logits_block<2>(a, panel, depth, c, g.ldo, cols, first); break;
            case 1: logits_block<1>(a, panel, depth, c, g.ldo, cols, first); break;
            default: break;
          }
        }
      }
    }
  }
}

#ifdef RLKERN_HAVE_AMX
// ---- lm_logits for bf16 on AMX (Sapphire Rapids and later) ------------------------------------------
// The same contract as above, at tile-unit speed (~1 TFLOPS a core against ~0.05 for the AVX-512
// loop): TDPBF16PS accumulates the exact bf16 products into fp32 tiles, so the logits are fp32 (a
// bf16 output GEMM rounds each logit by up to 2^-9 relative: 0.04 nats at z = 20). Each logit is
// the sum over k-steps of 32 in ascending order, each step one TDPBF16PS whose internal order is
// fixed by the hardware and independent of the other rows and columns of the tiles; rows and
// columns beyond the matrix are zero padding that is never stored. So the bits depend on neither
// the batch nor the threads. (The unit treats bf16 denormals as 0: < 1.2e-38, no logit notices.)
namespace amx {

constexpr int64_t kRows = 32, kCols = 32, kStep = 32;  // a 2 x 2 grid of 16 x 16 fp32 C tiles; k per step

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool available() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    // Linux grants the 8 KiB tile state only on request, once per process (oneDNN asks the same way).
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

// weight [v, H] -> panels of 32 ids in the tile unit's pair layout: packed[p][k / 2][c][k % 2] =
// weight[32 p + c][k], zero past v and H (H rounded up to `depth`, a multiple of 32).
void pack_weight(const uint16_t* w, int64_t v, int64_t h, int64_t depth, uint16_t* packed) {
  const int64_t panels = (v + kCols - 1) / kCols;
  at::parallel_for(0, panels, grain_for(kCols * depth), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      uint16_t* out = packed + p * kCols * depth;
      std::fill(out, out + kCols * depth, uint16_t{0});
      // k pairs outer, columns inner: each output row of 128 bytes is written once, in order, from
      // 32 sequential read streams (columns outer wrote 4 bytes every 128: 2x slower overall).
      const int64_t cols = std::min(kCols, v - p * kCols);
      const uint16_t* rows = w + p * kCols * h;
      int64_t k = 0;
      for (; k + 1 < h; k += 2) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + k * kCols);
        for (int64_t c = 0; c < cols; ++c) std::memcpy(dst + c, rows + c * h + k, 4);
      }
      if (k < h) {
        for (int64_t c = 0; c < cols; ++c) out[k * kCols + c * 2] = rows[c * h + k];
      }
    }
  });
}

// Task t = (group of 16 panels, block of 32 tokens), group-major: a thread's consecutive tasks share
// the group's 1 MiB of packed weight (at H = 1024), which then stays in L2 while the tokens stream.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void blocks(int64_t b, int64_t e, int64_t n_blocks,
                                                                  const uint16_t* hidden, const uint16_t* packed,
                                                                  const LogitsGeometry& g, int64_t depth,
                                                                  float* out) {
  constexpr int64_t kPanelsPerGroup = 16;
  const int64_t panels = (g.cols + kCols - 1) / kCols;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  std::vector<uint16_t> pad(kRows * depth);
  alignas(64) float c[kRows * kCols];
  int64_t packed_block = -1;
  for (int64_t task = b; task < e; ++task) {
    const int64_t group = task / n_blocks, block = task % n_blocks;
    const int64_t row0 = block * kRows, rows = std::min(kRows, g.rows - row0);
    // Full blocks are read in place; a partial one (or H not a multiple of 32) is zero-padded first.
    const uint16_t* a = hidden + row0 * g.depth;
    if (rows < kRows || depth != g.depth) {
      if (block != packed_block) {
        std::fill(pad.begin(), pad.end(), uint16_t{0});
        for (int64_t i = 0; i < rows; ++i) std::memcpy(&pad[i * depth], a + i * g.depth, g.depth * 2);
        packed_block = block;
      }
      a = pad.data();
    }
    const int64_t p_end = std::min(panels, (group + 1) * kPanelsPerGroup);
    for (int64_t p = group * kPanelsPerGroup; p < p_end; ++p) {
      const uint16_t* w = packed + p * kCols * depth;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < depth; k0 += kStep) {
        _tile_loadd(4, &a[k0], depth * 2);
        _tile_loadd(5, &a[16 * depth + k0], depth * 2);
        _tile_loadd(6, w + k0 * kCols, kCols * 4);
        _tile_loadd(7, w + k0 * kCols + 32, kCols * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, kCols * 4);
      _tile_stored(1, c + 16, kCols * 4);
      _tile_stored(2, c + 16 * kCols, kCols * 4);
      _tile_stored(3, c + 16 * kCols + 16, kCols * 4);
      const int64_t cols = std::min(kCols, g.cols - p * kCols);
      for (int64_t i = 0; i < rows; ++i) std::memcpy(out + (row0 + i) * g.ldo + p * kCols, c + i * kCols, cols * 4);
    }
  }
  _tile_release();
}

// hidden [rows, H] against a weight tile already packed by pack_weight (depth = H rounded up to 32).
void run(const c10::BFloat16* hidden, const uint16_t* packed, const LogitsGeometry& g, int64_t depth, float* out) {
  constexpr int64_t kPanelsPerGroup = 16;
  const int64_t panels = (g.cols + kCols - 1) / kCols;
  const int64_t groups = (panels + kPanelsPerGroup - 1) / kPanelsPerGroup;
  const int64_t n_blocks = (g.rows + kRows - 1) / kRows;
  const int64_t work = std::min(kRows, g.rows) * std::min(kPanelsPerGroup * kCols, g.cols) * depth;
  at::parallel_for(0, n_blocks * groups, grain_for(work), [&](int64_t b, int64_t e) {
    blocks(b, e, n_blocks, reinterpret_cast<const uint16_t*>(hidden), packed, g, depth, out);
  });
}

}  // namespace amx
#endif

// acc[i] += part[i] for i in [begin, end): the fp32 sum over vocabulary tiles of the bf16/fp16
// d hidden products (ATen's mixed-dtype add_ goes through a casting copy and is ~5x slower).
template <typename T>
RLKERN_INLINE void accumulate_range(int64_t begin, int64_t end, float* acc, const T* part) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) store16(acc + i, load16(acc + i) + load16(part + i));
  for (; i < end; ++i) acc[i] += static_cast<float>(part[i]);
}

// One clone set per storage type, each covering a range of rows so the CPU-feature dispatch is
// paid once per thread chunk.
#define RLKERN_TILE_KERNELS(T, SUFFIX)                                                                    \
  RLKERN_CLONES void fold_rows_##SUFFIX(int64_t b, int64_t e, const T* x, const TileGeometry& g,          \
                                        const float* bias, const int64_t* y, int64_t ii, float it, bool we, \
                                        const FoldState& st) {                                           \
    fold_rows<T>(b, e, x, g, bias, y, ii, it, we, st);                                                   \
  }                                                                                                     \
  RLKERN_CLONES void grad_rows_##SUFFIX(int64_t b, int64_t e, T* x, const TileGeometry& g, const float* bias, \
                                        const int64_t* y, int64_t ii, float it, const GradState& st) {    \
    grad_rows<T>(b, e, x, g, bias, y, ii, it, st);                                                       \
  }                                                                                                     \
  RLKERN_CLONES void accumulate_##SUFFIX(int64_t b, int64_t e, float* acc, const T* part) {              \
    accumulate_range<T>(b, e, acc, part);                                                               \
  }
RLKERN_TILE_KERNELS(float, f32)
RLKERN_TILE_KERNELS(c10::BFloat16, bf16)
RLKERN_TILE_KERNELS(c10::Half, f16)
#undef RLKERN_TILE_KERNELS

void fold_dispatch(int64_t b, int64_t e, const float* x, const TileGeometry& g, const float* bias, const int64_t* y,
                   int64_t ii, float it, bool we, const FoldState& st) {
  fold_rows_f32(b, e, x, g, bias, y, ii, it, we, st);
}
void fold_dispatch(int64_t b, int64_t e, const c10::BFloat16* x, const TileGeometry& g, const float* bias,
                   const int64_t* y, int64_t ii, float it, bool we, const FoldState& st) {
  fold_rows_bf16(b, e, x, g, bias, y, ii, it, we, st);
}
void fold_dispatch(int64_t b, int64_t e, const c10::Half* x, const TileGeometry& g, const float* bias,
                   const int64_t* y, int64_t ii, float it, bool we, const FoldState& st) {
  fold_rows_f16(b, e, x, g, bias, y, ii, it, we, st);
}
void grad_dispatch(int64_t b, int64_t e, float* x, const TileGeometry& g, const float* bias, const int64_t* y,
                   int64_t ii, float it, const GradState& st) {
  grad_rows_f32(b, e, x, g, bias, y, ii, it, st);
}
void grad_dispatch(int64_t b, int64_t e, c10::BFloat16* x, const TileGeometry& g, const float* bias,
                   const int64_t* y, int64_t ii, float it, const GradState& st) {
  grad_rows_bf16(b, e, x, g, bias, y, ii, it, st);
}
void grad_dispatch(int64_t b, int64_t e, c10::Half* x, const TileGeometry& g, const float* bias, const int64_t* y,
                   int64_t ii, float it, const GradState& st) {
  grad_rows_f16(b, e, x, g, bias, y, ii, it, st);
}

void accumulate_dispatch(int64_t b, int64_t e, float* acc, const float* part) { accumulate_f32(b, e, acc, part); }
void accumulate_dispatch(int64_t b, int64_t e, float* acc, const c10::BFloat16* part) {
  accumulate_bf16(b, e, acc, part);
}
void accumulate_dispatch(int64_t b, int64_t e, float* acc, const c10::Half* part) { accumulate_f16(b, e, acc, part); }

RLKERN_CLONES void logits_f32(int64_t b, int64_t e, const float* pa, const float* packed, const LogitsGeometry& g,
                              float* out) {
  logits_tasks(b, e, pa, packed, g, out);
}

TileGeometry tile_geometry(const at::Tensor& tile, int64_t vocab_start) {
  TORCH_CHECK(tile.dim() == 2, "tile must be a 2-d [tokens, vocab] tensor, got ", tile.dim(), " dims");
  TORCH_CHECK(tile.size(1) > 0, "tile must have at least one vocabulary column");
  TORCH_CHECK(tile.stride(1) == 1 && tile.stride(0) >= tile.size(1), "tile rows must be contiguous");
  return {tile.stride(0), tile.size(1), vocab_start};
}

// A per-token float32 vector, or nullptr when absent (None).
float* f32_rows(const std::optional<at::Tensor>& t, int64_t rows, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows, name,
              " must be a contiguous float32 tensor with one entry per tile row (", rows, " rows)");
  return t->data_ptr<float>();
}

const float* f32_bias(const std::optional<at::Tensor>& bias, int64_t len) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == len,
              "bias must be a contiguous float32 slice with one entry per tile column (", len, ")");
  return bias->data_ptr<float>();
}

const int64_t* tile_labels(const at::Tensor& labels, int64_t rows) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == rows,
              "labels must be a contiguous int64 tensor with one entry per tile row (", rows, " rows)");
  return labels.data_ptr<int64_t>();
}

// hidden [N, H]'s rows as the fp32 loop reads them (pack_rows), packed once for every token tile of
// `tile` rows: once per call rather than once per vocabulary tile.
class PackedRows {
 public:
  PackedRows(const at::Tensor& hidden, int64_t tile) : tile_(std::max<int64_t>(tile, 1)), depth_(hidden.size(1)) {
    const int64_t n = hidden.size(0), tiles = (n + tile_ - 1) / tile_;
    buf_ = at::empty({tiles * packed_tile_rows(tile_) * depth_}, at::kFloat);
    dispatch_storage_type(hidden.scalar_type(), "hidden", [&](auto tag) {
      using T = decltype(tag);
      pack_rows(static_cast<const T*>(hidden.data_ptr()), n, depth_, tile_, buf_.data_ptr<float>());
    });
  }

  // The packed rows of the token tile that starts at row n0 (a multiple of the tile).
  const float* tile_at(int64_t n0) const { return buf_.data_ptr<float>() + n0 / tile_ * packed_tile_rows(tile_) * depth_; }

 private:
  int64_t tile_, depth_;
  at::Tensor buf_;
};

// The logits of one weight tile against any number of token tiles, with the weight packed once per
// tile (packing it, and allocating and faulting in its buffer, per token tile cost ~10% of the GEMM).
// fp32: the packed AVX loop; bf16: AMX where present; fp16 and bf16 without AMX: widened to fp32
// (exact) and the fp32 loop (converting in its inner loop cost 2.5x). The buffers are sized once for
// the widest tile, 64-byte aligned and left uninitialised (every element read is packed first).
class TileLogits {
 public:
  TileLogits(at::ScalarType dtype, int64_t max_cols, int64_t depth) : depth_(depth) {
    dispatch_storage_type(dtype, "hidden", [](auto) {});
    amx_ = uses_amx(dtype);
#ifdef RLKERN_HAVE_AMX
    if (amx_) {
      amx_depth_ = (depth + amx::kStep - 1) / amx::kStep * amx::kStep;
      packed16_ = at::empty({(max_cols + amx::kCols - 1) / amx::kCols * amx::kCols * amx_depth_}, at::kBFloat16);
    }
#endif
    widen_ = dtype != at::kFloat && !amx_;
    if (!amx_) packed32_ = at::empty({(max_cols + kPanel - 1) / kPanel * kPanel * depth}, at::kFloat);
  }

  void set_weight(const at::Tensor& weight) {
    cols_ = weight.size(0);
    if (depth_ == 0 || cols_ == 0) return;
#ifdef RLKERN_HAVE_AMX
    if (amx_) {
      amx::pack_weight(static_cast<const uint16_t*>(weight.data_ptr()), cols_, depth_, amx_depth_, packed16());
      return;
    }
#endif
    const at::Tensor w32 = widen_ ? weight.to(at::kFloat) : weight;
    pack_panels_f32(w32.data_ptr<float>(), cols_, depth_, packed32_.data_ptr<float>());
  }

  // bf16 on a CPU with AMX: the tile unit, which reads hidden itself; else the fp32 loop, which reads
  // PackedRows.
  static bool uses_amx(at::ScalarType dtype) {
#ifdef RLKERN_HAVE_AMX
    return dtype == at::kBFloat16 && amx::available();
#else
    (void)dtype;
    return false;
#endif
  }

  // out = hidden's logits against the weight tile. rows: hidden's PackedRows (tile_at), or nullptr to
  // pack them here (ignored on AMX).
  void compute(const at::Tensor& hidden, at::Tensor out, const float* rows = nullptr) const {
    const LogitsGeometry g{hidden.size(0), cols_, depth_, out.stride(0)};
    if (g.rows == 0 || g.cols == 0) return;
    float* o = out.data_ptr<float>();
    if (g.depth == 0) {
      for (int64_t i = 0; i < g.rows; ++i) std::fill(o + i * g.ldo, o + i * g.ldo + g.cols, 0.f);
      return;
    }
#ifdef RLKERN_HAVE_AMX
    if (amx_) {
      amx::run(static_cast<const c10::BFloat16*>(hidden.data_ptr()), packed16(), g, amx_depth_, o);
      return;
    }
#endif
    std::optional<PackedRows> own;
    if (rows == nullptr) rows = own.emplace(hidden, g.rows).tile_at(0);
    const float* w = packed32_.data_ptr<float>();
    const int64_t panels = (g.cols + kPanel - 1) / kPanel;
    const int64_t tasks = (panels + kPanelsPerTask - 1) / kPanelsPerTask * ((g.rows + kRowsPerTask - 1) / kRowsPerTask);
    const int64_t work = std::min(kRowsPerTask, g.rows) * std::min(kPanelsPerTask * kPanel, g.cols) * g.depth;
    at::parallel_for(0, tasks, grain_for(work), [&](int64_t b, int64_t e) { logits_f32(b, e, rows, w, g, o); });
  }

 private:
  int64_t depth_, cols_ = 0;
  bool amx_ = false, widen_ = false;
  int64_t amx_depth_ = 0;
  // at::empty: 64-byte aligned (a 16-byte aligned panel split every zmm load across two cache lines)
  at::Tensor packed32_, packed16_;
  uint16_t* packed16() const { return static_cast<uint16_t*>(packed16_.data_ptr()); }
};

// Whole rows per task, enough work (~64k logits) per task to amortise the thread hand-off.
int64_t rows_per_task(int64_t len) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(len, 1)); }

// lm_fold on row pointers already checked (st indexed by tile row).
void fold_tile(const at::Tensor& tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels, float it,
               int64_t ignore_index, int64_t vocab_start, bool want_entropy, const FoldState& st) {
  const int64_t rows = tile.size(0);
  const TileGeometry g = tile_geometry(tile, vocab_start);
  const float* b = f32_bias(bias, g.len);
  const int64_t* y = tile_labels(labels, rows);
  dispatch_storage_type(tile.scalar_type(), "tile", [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(tile.data_ptr());
    at::parallel_for(0, rows, rows_per_task(g.len), [&](int64_t begin, int64_t end) {
      fold_dispatch(begin, end, x, g, b, y, ignore_index, it, want_entropy, st);
    });
  });
}

// lm_grad on row pointers already checked (st indexed by tile row).
void grad_tile(at::Tensor tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels, float it,
               int64_t ignore_index, int64_t vocab_start, const GradState& st) {
  const int64_t rows = tile.size(0);
  const TileGeometry g = tile_geometry(tile, vocab_start);
  const float* b = f32_bias(bias, g.len);
  const int64_t* y = tile_labels(labels, rows);
  TORCH_CHECK(rows == 0 || st.lse != nullptr, "lm_grad needs lse for every row");
  TORCH_CHECK(st.grad_ent == nullptr || st.ent != nullptr, "the entropy gradient needs the saved entropy");
  dispatch_storage_type(tile.scalar_type(), "tile", [&](auto tag) {
    using T = decltype(tag);
    T* x = static_cast<T*>(tile.data_ptr());
    at::parallel_for(0, rows, rows_per_task(g.len), [&](int64_t begin, int64_t end) {
      grad_dispatch(begin, end, x, g, b, y, ignore_index, it, st);
    });
  });
}

// A row pointer advanced to row n0, or nullptr.
template <typename P>
P* at_row(P* p, int64_t n0) {
  return p != nullptr ? p + n0 : nullptr;
}

}  // namespace

void lm_fold(const at::Tensor& tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels, double inv_temp,
             int64_t ignore_index, int64_t vocab_start, bool want_entropy, at::Tensor m, at::Tensor s, at::Tensor t,
             at::Tensor zy, const std::optional<at::Tensor>& inv_temp_rows, const std::optional<at::Tensor>& q) {
  const int64_t rows = tile.size(0);
  const FoldState st{f32_rows(m, rows, "m"),          f32_rows(s, rows, "s"),
                     f32_rows(t, rows, "t"),          f32_rows(zy, rows, "zy"),
                     f32_rows(q, rows, "q"),          f32_rows(inv_temp_rows, rows, "inv_temp_rows")};
  TORCH_CHECK(rows == 0 || (st.m && st.s && st.t && st.zy), "lm_fold needs m, s, t and zy for every row");
  fold_tile(tile, bias, labels, static_cast<float>(inv_temp), ignore_index, vocab_start, want_entropy, st);
}

void lm_grad(at::Tensor tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
             const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent, const at::Tensor& lse,
             const std::optional<at::Tensor>& ent, double inv_temp, int64_t ignore_index, int64_t vocab_start,
             const std::optional<at::Tensor>& inv_temp_rows) {
  const int64_t rows = tile.size(0);
  const GradState st{f32_rows(grad_logp, rows, "grad_logp"), f32_rows(grad_ent, rows, "grad_entropy"),
                     f32_rows(lse, rows, "lse"), f32_rows(ent, rows, "entropy"),
                     f32_rows(inv_temp_rows, rows, "inv_temp_rows")};
  grad_tile(tile, bias, labels, static_cast<float>(inv_temp), ignore_index, vocab_start, st);
}

// out[i, j] = hidden[i] . weight[j] in fp32 (fixed order, see logits_block): hidden [n, H] and
// weight [v, H] contiguous in one storage type, out fp32 [n, v] with unit column stride.
void lm_logits(const at::Tensor& hidden, const at::Tensor& weight, at::Tensor out) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [n, H] and weight [v, H] must share H");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && hidden.scalar_type() == weight.scalar_type(),
              "hidden and weight must be contiguous and of one dtype");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == hidden.size(0) &&
                  out.size(1) == weight.size(0) && out.stride(1) == 1 && out.stride(0) >= out.size(1),
              "out must be a float32 [n, v] tensor with contiguous rows");
  TileLogits tiles(hidden.scalar_type(), weight.size(0), hidden.size(1));
  tiles.set_weight(weight);
  tiles.compute(hidden, out);
}

// acc (fp32) += part (fp32 / bf16 / fp16), both contiguous and of the same shape.
void lm_accumulate(at::Tensor acc, const at::Tensor& part) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "acc must be a contiguous float32 tensor");
  TORCH_CHECK(part.is_contiguous() && part.sizes() == acc.sizes(), "part must be contiguous with acc's shape ",
              acc.sizes(), ", got ", part.sizes());
  float* a = acc.data_ptr<float>();
  dispatch_storage_type(part.scalar_type(), "part", [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(part.data_ptr());
    at::parallel_for(0, acc.numel(), 1 << 15, [&](int64_t begin, int64_t end) { accumulate_dispatch(begin, end, a, p); });
  });
}

namespace {

std::optional<at::Tensor> slice_of(const std::optional<at::Tensor>& t, int64_t start, int64_t len) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, start, len)) : std::nullopt;
}

void check_operands(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t token_tile,
                    int64_t vocab_tile) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && hidden.is_contiguous() &&
                  weight.is_contiguous() && hidden.scalar_type() == weight.scalar_type(),
              "hidden [N, H] and weight [V, H] must be contiguous, of one dtype, and share H");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == hidden.size(0),
              "labels must be a contiguous int64 tensor with one entry per token");
  TORCH_CHECK(token_tile >= 1 && vocab_tile >= 1, "tile sizes must be >= 1");
}

}  // namespace

// Merges one vocabulary tile's fold state (mt, St, Tt, Qt) into a token's running (M, S, T, Q): both
// moved to the larger max, S = a S + c St, T = a (T + (M - M') S) + c (Tt + (mt - M') St),
// Q = a^2 Q + c^2 Qt. A NaN state (a NaN or +inf logit) makes the token NaN; an empty tile (every
// logit -inf: St = 0) changes nothing.
static inline void merge_state(float mt, float St, float Tt, float Qt, float& M, float& S, float& T, float& Q) {
  if (St != St || S != S) {
    M = S = T = Q = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (St == 0.f) return;
  if (S == 0.f) {
    M = mt, S = St, T = Tt, Q = Qt;
    return;
  }
  const float top = std::max(M, mt);
  const float a = std::exp(M - top), c = std::exp(mt - top);
  T = a * (T + (M - top) * S) + c * (Tt + (mt - top) * St);
  S = a * S + c * St;
  Q = a * a * Q + c * c * Qt;
  M = top;
}

// The forward over all tiles. Vocabulary tiles (a width independent of N) are split across threads,
// one parallel region for the whole call: each thread packs its tiles' weight once and runs lm_logits
// and the fold single-threaded over the token tiles, writing per (vocabulary tile, token) the fold
// state (m, S, T[, Q]) of that tile alone (and z_y, from the one tile that holds the label). The
// states are then merged per token in vocabulary-tile order, so a token's result depends on its own
// logits only: not on the batch, nor on how many threads there are or which tiles each took. (A region
// per tile, as before, cost a thread hand-off per GEMM tile and, with 512-wide tiles on a busy 2-core
// machine, a scheduler quantum at each barrier.) Then lse = M + log S, H = min(log S - T / S, ln V)
// and sum p^2 = Q / S^2 (a token whose logits are all -inf gets lse = -inf, H = 0, sum p^2 = 0; NaN
// stays). inv_temp_rows: fp32 [N] per-token inverse temperatures replacing inv_temp, or None;
// sum_p2: fp32 [N] output, or None. Every row index and offset is int64 (N and N * V past 2^31 are
// fine; tests/test_lm_head.py runs N = 65,600 x V = 32,769).
void linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, double inv_temp, int64_t ignore_index, int64_t vocab_start,
                         bool want_entropy, int64_t token_tile, int64_t vocab_tile, const std::string& precision,
                         at::Tensor lse, const std::optional<at::Tensor>& ent, at::Tensor zy,
                         const std::optional<at::Tensor>& inv_temp_rows, const std::optional<at::Tensor>& sum_p2) {
  (void)precision;  // the C++ GEMM is IEEE fp32 whatever the Triton option says
  check_operands(hidden, weight, labels, token_tile, vocab_tile);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  float* lse_p = f32_rows(lse, n, "lse");
  TORCH_CHECK(!want_entropy || ent.has_value(), "want_entropy needs an ent output");
  float* ent_p = want_entropy ? f32_rows(ent, n, "ent") : nullptr;
  float* p2_p = f32_rows(sum_p2, n, "sum_p2");
  const float* inv_p = f32_rows(inv_temp_rows, n, "inv_temp_rows");
  (void)f32_rows(zy, n, "zy");
  if (n == 0) return;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  zy.zero_();
  float* zy_p = zy.data_ptr<float>();
  const int64_t tn = std::min(token_tile, n), tv = std::min(vocab_tile, vocab);
  const int64_t tiles = (vocab + tv - 1) / tv;
  const int64_t n_state = p2_p != nullptr ? 4 : 3;
  at::Tensor state = at::empty({n_state, tiles, n}, f32);  // (m, S, T[, Q]) of each vocabulary tile alone
  float* st0 = state.data_ptr<float>();
  // Tiles are handed out one at a time (a shared counter), so a thread slowed by another process on
  // its core takes fewer of them; which thread computes a tile does not change its bits.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tiles);
  std::optional<PackedRows> packed_rows;  // read by every vocabulary tile (not on AMX)
  if (!TileLogits::uses_amx(hidden.scalar_type())) packed_rows.emplace(hidden, tn);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor buf = at::empty({tn * tv}, f32);  // fp32 logits for every input dtype
    TileLogits logits(hidden.scalar_type(), tv, hidden.size(1));
    for (int64_t vt = next++; vt < tiles; vt = next++) {
      const int64_t v0 = vt * tv, v = std::min(tv, vocab - v0);
      const auto b = slice_of(bias, v0, v);
      logits.set_weight(weight.narrow(0, v0, v));
      float* m = st0 + vt * n;
      float* s = m + tiles * n;
      float* t = s + tiles * n;
      float* q = n_state == 4 ? t + tiles * n : nullptr;
      std::fill(m, m + n, -kInf);
      std::fill(s, s + n, 0.f);
      std::fill(t, t + n, 0.f);
      if (q != nullptr) std::fill(q, q + n, 0.f);
      for (int64_t n0 = 0; n0 < n; n0 += tn) {  // nested parallel_for calls below run inline
        const int64_t rows = std::min(tn, n - n0);
        at::Tensor tile = buf.narrow(0, 0, rows * v).view({rows, v});
        logits.compute(hidden.narrow(0, n0, rows), tile, packed_rows ? packed_rows->tile_at(n0) : nullptr);
        const FoldState st{m + n0, s + n0, t + n0, zy_p + n0, at_row(q, n0), at_row(inv_p, n0)};
        fold_tile(tile, b, labels.narrow(0, n0, rows), static_cast<float>(inv_temp), ignore_index, vocab_start + v0,
                  want_entropy, st);
      }
    }
  });
  at::Tensor merged = at::empty({4, n}, f32);
  float* mp = merged.data_ptr<float>();
  float* sp = mp + n;
  float* tp = sp + n;
  float* qp = tp + n;
  std::fill(mp, mp + n, -kInf);
  std::fill(sp, sp + 3 * n, 0.f);
  for (int64_t vt = 0; vt < tiles; ++vt) {  // tile order, each tile's states read in sequence
    const float* tm = st0 + vt * n;
    const float* ts = tm + tiles * n;
    const float* tt = ts + tiles * n;
    const float* tq = n_state == 4 ? tt + tiles * n : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      merge_state(tm[i], ts[i], tt[i], tq != nullptr ? tq[i] : 0.f, mp[i], sp[i], tp[i], qp[i]);
    }
  }
  const float log_v = std::log(static_cast<float>(vocab));
  for (int64_t i = 0; i < n; ++i) {
    const bool dead = sp[i] == 0.f;  // a NaN S is not dead: its outputs stay NaN
    const float safe_s = dead ? 1.f : sp[i];
    const float log_s = std::log(safe_s);
    lse_p[i] = dead ? -kInf : mp[i] + log_s;
    if (want_entropy) {
      const float h = dead ? 0.f : log_s - tp[i] / safe_s;
      ent_p[i] = h != h ? h : std::min(h, log_v);  // rounding of a near-uniform row; NaN stays NaN
    }
    if (p2_p != nullptr) p2_p[i] = dead ? 0.f : qp[i] / (safe_s * safe_s);
  }
}

namespace {

// d bias of vocabulary rows [v0, v0 + v) from one token tile's d logits (fp32): set by the first token
// tile, added by the next ones.
void add_bias_grad(const std::optional<at::Tensor>& grad_bias, int64_t v0, int64_t v, const at::Tensor& dz,
                   bool first) {
  if (!grad_bias.has_value()) return;
  at::Tensor gb = grad_bias->narrow(0, v0, v);
  if (first) {
    at::sum_out(gb, dz, {0});
  } else {
    gb.add_(dz.sum(0));
  }
}

// The backward in one parallel region: each worker takes a contiguous range of vocabulary tiles (the
// range depends on the worker count only) and runs the tile loop of linear_logprobs_bwd below with
// single-threaded GEMMs, d weight / d bias rows being its own; its d hidden goes to a private fp32
// [N, H] partial (worker 0: grad_hidden itself), and the partials are added in worker order at the
// end, so the result does not depend on scheduling. This replaces four or more parallel regions per
// vocabulary tile (threaded GEMMs and the epilogue): at 2 threads on a loaded 2-core machine each of
// their barriers waited for a descheduled thread (measured at N=1024, H=512, V=32768: the fp32
// backward 1.6x its 3 GEMMs). Each worker's tile is 1/workers of the budgeted width.
void bwd_workers(const GradState& rows_in, const at::Tensor& hidden, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& labels, float inv_temp, int64_t ignore_index,
                 int64_t vocab_start, int64_t tn, int64_t tv, int64_t workers, at::Tensor grad_hidden,
                 at::Tensor grad_weight, const std::optional<at::Tensor>& grad_bias) {
  const int64_t n = hidden.size(0), vocab = weight.size(0), hs = hidden.size(1);
  const int64_t tiles = (vocab + tv - 1) / tv;
  const bool one_token_tile = tn >= n, exact = hidden.scalar_type() == at::kFloat;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor partials = at::empty({workers - 1, n, hs}, f32);
  std::optional<PackedRows> packed_rows;  // bf16 / fp16 off AMX: lm_logits' rows, shared by the workers
  if (!exact && !TileLogits::uses_amx(hidden.scalar_type())) packed_rows.emplace(hidden, tn);
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    // Grad mode is thread-local: a pool thread has it on, and the saved hidden / weight require grad,
    // which the out= GEMMs refuse (autograd's own thread runs this with it off).
    c10::AutoGradMode no_grad(false);
    for (int64_t wk = wb; wk < we; ++wk) {
      at::Tensor gh_all = wk == 0 ? grad_hidden : partials[wk - 1];
      at::Tensor buf = at::empty({tn * tv}, f32);  // fp32 logits, then d logits
      at::Tensor low, dh_part, dw_acc;
      std::optional<TileLogits> logits;  // bf16 / fp16: fp32 logits from lm_logits' loop
      if (!exact) {
        logits.emplace(hidden.scalar_type(), tv, hs);
        low = at::empty({tn * tv}, hidden.options());  // d logits in the GEMMs' dtype
        dh_part = at::empty({tn, hs}, hidden.options());
        if (!one_token_tile) dw_acc = at::empty({tv, hs}, f32);
      }
      const int64_t t0 = tiles * wk / workers, t1 = tiles * (wk + 1) / workers;
      if (t0 == t1) gh_all.zero_();
      for (int64_t vt = t0; vt < t1; ++vt) {
        const int64_t v0 = vt * tv, v = std::min(tv, vocab - v0);
        const at::Tensor w_tile = weight.narrow(0, v0, v);
        const auto b = slice_of(bias, v0, v);
        at::Tensor gw = grad_weight.narrow(0, v0, v);
        if (logits) logits->set_weight(w_tile);
        int64_t i = 0;
        for (int64_t n0 = 0; n0 < n; n0 += tn, ++i) {
          const int64_t rows = std::min(tn, n - n0);
          const at::Tensor h_tile = hidden.narrow(0, n0, rows);
          at::Tensor dz32 = buf.narrow(0, 0, rows * v).view({rows, v});
          if (exact) {
            at::mm_out(dz32, h_tile, w_tile.t());
          } else {
            logits->compute(h_tile, dz32, packed_rows ? packed_rows->tile_at(n0) : nullptr);
          }
          const GradState st{at_row(rows_in.grad_logp, n0), at_row(rows_in.grad_ent, n0), at_row(rows_in.lse, n0),
                             at_row(rows_in.ent, n0), at_row(rows_in.inv, n0)};
          grad_tile(dz32, b, labels.narrow(0, n0, rows), inv_temp, ignore_index, vocab_start + v0, st);
          at::Tensor gh = gh_all.narrow(0, n0, rows);
          at::Tensor dz = dz32;
          if (exact) {
            if (vt == t0) {
              at::mm_out(gh, dz, w_tile);
            } else {
              gh.addmm_(dz, w_tile);
            }
          } else {
            dz = low.narrow(0, 0, rows * v).view({rows, v}).copy_(dz32);
            at::Tensor part = dh_part.narrow(0, 0, rows);
            at::mm_out(part, dz, w_tile);
            if (vt == t0) {
              gh.copy_(part);
            } else {
              lm_accumulate(gh, part);
            }
          }
          if (one_token_tile || (exact && i == 0)) {
            at::mm_out(gw, dz.t(), h_tile);
          } else if (exact) {
            gw.addmm_(dz.t(), h_tile);
          } else {
            at::Tensor acc = dw_acc.narrow(0, 0, v);
            const at::Tensor part = at::mm(dz.t(), h_tile);
            if (i == 0) {
              acc.copy_(part);
            } else {
              lm_accumulate(acc, part);
            }
          }
          add_bias_grad(grad_bias, v0, v, dz32, i == 0);
        }
        if (dw_acc.defined()) gw.copy_(dw_acc.narrow(0, 0, v));
      }
    }
  });
  for (int64_t wk = 1; wk < workers; ++wk) grad_hidden.add_(partials[wk - 1]);
}

}  // namespace

// The backward over all tiles, vocabulary-outer so that d weight is finished one vocabulary tile at a
// time: each tile's logits are recomputed (MKL for fp32, which needs no batch invariance here;
// lm_logits' fp32 logits for bf16 / fp16, AMX where present), turned into d logits in place by
// lm_grad, and multiplied into d hidden (fp32, summed over vocabulary tiles) and d weight (weight's
// dtype; summed over token tiles in fp32 when there are several). grad_bias: fp32 [V] or None;
// inv_temp_rows: fp32 [N] per-token inverse temperatures replacing inv_temp, or None.
void linear_logprobs_bwd(const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent,
                         const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& ent,
                         double inv_temp, int64_t ignore_index, int64_t vocab_start, int64_t token_tile,
                         int64_t vocab_tile, const std::string& precision, at::Tensor grad_hidden, at::Tensor grad_weight,
                         const std::optional<at::Tensor>& grad_bias, const std::optional<at::Tensor>& inv_temp_rows) {
  (void)precision;
  check_operands(hidden, weight, labels, token_tile, vocab_tile);
  const int64_t n = hidden.size(0), vocab = weight.size(0), hs = hidden.size(1);
  const GradState rows_in{f32_rows(grad_logp, n, "grad_logp"), f32_rows(grad_ent, n, "grad_entropy"),
                          f32_rows(lse, n, "lse"), f32_rows(ent, n, "entropy"),
                          f32_rows(inv_temp_rows, n, "inv_temp_rows")};
  TORCH_CHECK(grad_hidden.scalar_type() == at::kFloat && grad_hidden.is_contiguous() &&
                  grad_hidden.sizes() == hidden.sizes(), "grad_hidden must be a contiguous float32 [N, H] tensor");
  TORCH_CHECK(grad_weight.scalar_type() == weight.scalar_type() && grad_weight.is_contiguous() &&
                  grad_weight.sizes() == weight.sizes(), "grad_weight must be contiguous, in weight's dtype and shape");
  TORCH_CHECK(!grad_bias.has_value() || (grad_bias->scalar_type() == at::kFloat && grad_bias->is_contiguous() &&
                                         grad_bias->numel() == vocab), "grad_bias must be a float32 [V] tensor");
  grad_hidden.zero_();
  if (n == 0) {
    grad_weight.zero_();
    if (grad_bias.has_value()) grad_bias->zero_();
    return;
  }
  const bool exact = hidden.scalar_type() == at::kFloat;  // fp32 GEMMs accumulate in place
  const int64_t tn = std::min(token_tile, n), tv = std::min(vocab_tile, vocab);
  // Several threads: one parallel region (bwd_workers) while the workers' extra d hidden partials stay
  // within the tile memory budget's cap (64 MiB); each worker's tile is 1/workers as wide.
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, vocab / 64));
  if (workers > 1 && !at::in_parallel_region() && (workers - 1) * n * hs <= (int64_t{1} << 24)) {
    const int64_t tvw = tv < 128 ? tv : std::max<int64_t>(64, tv / workers / 64 * 64);
    bwd_workers(rows_in, hidden, weight, bias, labels, static_cast<float>(inv_temp), ignore_index, vocab_start, tn,
                tvw, std::min(workers, (vocab + tvw - 1) / tvw), grad_hidden, grad_weight, grad_bias);
    return;
  }
  const bool one_token_tile = tn >= n;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor buf = at::empty({tn * tv}, f32);  // fp32 logits, then d logits
  at::Tensor low, dh_part, dw_acc;
  std::optional<TileLogits> logits;  // bf16 / fp16: fp32 logits from lm_logits' loop
  std::optional<PackedRows> packed_rows;  // its rows operand off AMX, packed once
  if (!exact) {
    logits.emplace(hidden.scalar_type(), tv, hs);
    if (!TileLogits::uses_amx(hidden.scalar_type())) packed_rows.emplace(hidden, tn);
    low = at::empty({tn * tv}, hidden.options());  // d logits in the GEMMs' dtype
    dh_part = at::empty({tn, hs}, hidden.options());
    if (!one_token_tile) dw_acc = at::empty({tv, hs}, f32);
  }
  for (int64_t v0 = 0; v0 < vocab; v0 += tv) {
    const int64_t v = std::min(tv, vocab - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, v);
    const auto b = slice_of(bias, v0, v);
    at::Tensor gw = grad_weight.narrow(0, v0, v);
    if (logits) logits->set_weight(w_tile);
    int64_t i = 0;
    for (int64_t n0 = 0; n0 < n; n0 += tn, ++i) {
      const int64_t rows = std::min(tn, n - n0);
      const at::Tensor h_tile = hidden.narrow(0, n0, rows);
      at::Tensor dz32 = buf.narrow(0, 0, rows * v).view({rows, v});
      if (exact) {
        at::mm_out(dz32, h_tile, w_tile.t());
      } else {
        logits->compute(h_tile, dz32, packed_rows ? packed_rows->tile_at(n0) : nullptr);
      }
      const GradState st{at_row(rows_in.grad_logp, n0), at_row(rows_in.grad_ent, n0), at_row(rows_in.lse, n0),
                         at_row(rows_in.ent, n0), at_row(rows_in.inv, n0)};
      grad_tile(dz32, b, labels.narrow(0, n0, rows), static_cast<float>(inv_temp), ignore_index, vocab_start + v0, st);
      at::Tensor gh = grad_hidden.narrow(0, n0, rows);
      at::Tensor dz = dz32;
      if (exact) {
        gh.addmm_(dz, w_tile);
      } else {
        dz = low.narrow(0, 0, rows * v).view({rows, v}).copy_(dz32);
        at::Tensor part = dh_part.narrow(0, 0, rows);
        at::mm_out(part, dz, w_tile);
        lm_accumulate(gh, part);
      }
      if (one_token_tile || (exact && i == 0)) {
        at::mm_out(gw, dz.t(), h_tile);
      } else if (exact) {
        gw.addmm_(dz.t(), h_tile);
      } else {
        at::Tensor part = at::mm(dz.t(), h_tile);
        at::Tensor acc = dw_acc.narrow(0, 0, v);
        if (i == 0) {
          acc.copy_(part);
        } else {
          lm_accumulate(acc, part);
        }
      }
      add_bias_grad(grad_bias, v0, v, dz32, i == 0);
    }
    if (dw_acc.defined()) gw.copy_(dw_acc.narrow(0, 0, v));
  }
}

}  // namespace rlkern
