// The SIMD tile kernels of the CPU paged attention ops, compiled once per instruction set (AVX-512, AVX2 + FMA,
// portable) in paged_attention_isa.cpp and picked at run time: the extension is built for the baseline ISA.
//
// Both ops walk a stream of key rows (pointers into pages, extra rows or the chunk) in tiles of at most kTileKeys
// rows and keep a running online-softmax state in float32. Scores are in the log2 domain: the caller folds
// scale * log2(e) into the queries.
#pragma once
#include <cstdint>

namespace attngate::cpu::paged {

constexpr int kTileKeys = 64;
constexpr int kMaxWidth = 16;  // widest vector, in floats (AVX-512)

enum class RowType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One tile of key rows. Row j of the tile is visible to query position t iff lo[j] <= t <= hi[j]; `masked` is false
// when every row is visible to every query of the state (no test needed).
struct KeyTile {
  const void* k[kTileKeys];
  const void* v[kTileKeys];
  int32_t lo[kTileKeys];
  int32_t hi[kTileKeys];
  int n;
  bool masked;
};

// Running state of one prefill item: Mq query rows (a multiple of the kernel width; rows past the real ones are
// padding), head dim D.
struct PrefillState {
  int D, Mq;
  const float* qt;     // (D, Mq) queries, transposed, times scale * log2(e)
  const int32_t* pos;  // (Mq) query position t of each row
  float* ot;           // (D, Mq) unnormalised output, transposed
  float* m;            // (Mq) running max (log2 domain), -inf before any visible key
  float* l;            // (Mq) running sum of exp2(score - m)
  float* st;           // (kTileKeys, Mq) scratch: scores, then weights, of a tile
  float* alpha;        // (Mq) scratch
  float* kf;           // (kTileKeys, Dp) scratch: float copies of 16-bit rows
  float* vf;           // (kTileKeys, Dp) scratch
  const float* zeros;  // (Dp) zeros, Dp = D rounded up to kMaxWidth
  int dp;              // Dp
  float cap;           // softcap * log2(e), 0: off; scores become cap * tanh(score / cap) before the softmax
};

// Running state of one decode item: G query heads of one KV head.
struct DecodeState {
  int D, G, dp;     // dp: D rounded up to kMaxWidth, the pitch of q and acc
  const float* q;   // (G, dp) queries times scale * log2(e), zero padded
  float* acc;       // (G, dp) unnormalised output
  float* m;         // (G) running max, -inf before any row
  float* l;         // (G) running sum
  float* s;         // (G, kTileKeys) scratch
  const float* zeros;  // (dp) zeros
  float cap;           // softcap * log2(e), 0: off; scores become cap * tanh(score / cap) before the softmax
};

struct Kernels {
  const char* name;
  int width;  // floats per vector; PrefillState::Mq must be a multiple of it
  // Adds one tile to a prefill state: scores = K Q^T, rule mask, online softmax, O^T += V^T P^T.
  void (*prefill_tile)(const KeyTile& tile, RowType type, PrefillState& st);
  // Adds one tile (all rows visible, tile.lo/hi unused) to a decode state.
  void (*decode_tile)(const KeyTile& tile, RowType type, DecodeState& st);
};

// The kernels for the best instruction set this CPU supports (chosen once).
const Kernels& kernels();

}  // namespace attngate::cpu::paged
