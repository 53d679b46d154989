// FM scan, forward, chunkwise-parallel: chunks of 8 tokens as 8 x 8 matrix
// products on simdgroup_matrix, the state passed from chunk to chunk.
//
// Per chunk, with a = 1 − θ the per-slot decay and θ = η α̃ (mlx_fm/ops/chunk.py):
//   reads  = A · X + (α̃ ⊙ F) · S,   A[t, s] = Σ_i α̃_{t,i} θ_{s,i} Π_{s<u≤t} a_{u,i}  (s ≤ t)
//   S'     = diag(F_last) · S + (θ ⊙ E)ᵀ · X
// F_t = Π_{u≤t} a_u and E_t = Π_{u>t} a_u within the chunk: products of numbers in
// [0, 1], never quotients, so nothing overflows.
//
// One threadgroup per (batch, head, group of COLUMN_TILES tiles of 8 value
// columns); SIMD group g owns tile g and keeps its state S (SLOTS x 8) as
// SLOTS / 8 matrices. The threads of the threadgroup first build the chunk's
// head-wide tiles (α̃ ⊙ F, (θ ⊙ E)ᵀ, diag(F_last), A) in threadgroup memory;
// then each SIMD group multiplies. Template: M slots, SLOTS = M rounded up to
// 8 (padded slots and tokens past T have α̃ = θ = 0), COLUMN_TILES.
// Inputs: x (B, T, H, P) any float type; slot_weights α̃ (B, T, H, M) float32;
// eta (B, T, H) float32; state (B, H, M, P) float32.
// Outputs: reads (B, T, H, P); final_state (B, H, M, P); checkpoints
// (B, H, N, M, P) with N = ceil(T / 8): the state entering each chunk, for
// fm_scan_chunkwise_backward.metal. The header defines FM_SCAN_CHECKPOINTS:
// 0 builds the inference variant, without the checkpoints output.

constexpr int Q = 8;  // tokens per chunk: one matrix tile
constexpr int BLOCKS = SLOTS / 8;
threadgroup float weights[Q * SLOTS];         // α̃[t][i]
threadgroup float thetas[Q * SLOTS];          // θ[t][i]
threadgroup float queries[Q * SLOTS];         // α̃ ⊙ F, [t][i]
threadgroup float keys[SLOTS * Q];            // (θ ⊙ E)ᵀ, [i][t]
threadgroup float chunk_decay[SLOTS * Q];     // diag(F_last) by blocks: [i][i % 8]
threadgroup float scores[Q * Q];              // A[t][s]
threadgroup float values[COLUMN_TILES * Q * 8];  // X of each tile, [t][column]
threadgroup float staged[COLUMN_TILES * 64];  // each SIMD group's 8 x 8 exchange

const uint lane = thread_index_in_simdgroup;
const uint tile = simdgroup_index_in_threadgroup;
const uint thread_index = thread_index_in_threadgroup;
const uint thread_count = threads_per_threadgroup.x * threads_per_threadgroup.y;
const uint head_row = threadgroup_position_in_grid.z;  // batch * H + head
const uint first_column = (threadgroup_position_in_grid.y * COLUMN_TILES + tile) * 8;
const uint length = x_shape[1];
const uint heads = x_shape[2];
const uint width = x_shape[3];
const uint batch = head_row / heads;
const uint head = head_row % heads;
threadgroup float* tile_stage = staged + tile * 64;

simdgroup_float8x8 state_blocks[BLOCKS];
for (int b = 0; b < BLOCKS; ++b) {
  for (uint k = lane; k < 64; k += 32) {
    const uint i = 8 * b + k / 8, column = first_column + k % 8;
    tile_stage[k] =
        i < M && column < width ? state[(ulong(head_row) * M + i) * width + column] : 0.0f;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_load(state_blocks[b], tile_stage, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

for (uint start = 0; start < length; start += Q) {
#if FM_SCAN_CHECKPOINTS
  const uint chunks = (length + Q - 1) / Q;
  device float* checkpoint = checkpoints + (ulong(head_row) * chunks + start / Q) * M * width;
  for (int b = 0; b < BLOCKS; ++b) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(state_blocks[b], tile_stage, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (uint k = lane; k < 64; k += 32) {
      const uint i = 8 * b + k / 8, column = first_column + k % 8;
      if (i < M && column < width) {
        checkpoint[ulong(i) * width + column] = tile_stage[k];
      }
    }
  }
#endif
  // 64-bit: B·T·H·M passes 2^32 from about a million tokens.
  const ulong first_token = (ulong(batch) * length + start) * heads + head;
  for (uint k = thread_index; k < Q * SLOTS; k += thread_count) {
    const uint t = k / SLOTS, i = k % SLOTS;
    const bool present = start + t < length && i < M;
    const ulong token = first_token + ulong(t) * heads;
    const float weight = present ? slot_weights[token * M + i] : 0.0f;
    weights[k] = weight;
    thetas[k] = present ? eta[token] * weight : 0.0f;
  }
  for (uint k = thread_index; k < COLUMN_TILES * Q * 8; k += thread_count) {
    const uint t = (k / 8) % Q, column = (threadgroup_position_in_grid.y * COLUMN_TILES + k / 64) * 8 + k % 8;
    const ulong token = first_token + ulong(t) * heads;
    values[k] = start + t < length && column < width ? float(x[token * width + column]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (uint i = thread_index; i < SLOTS; i += thread_count) {
    float from_start = 1.0f;
    for (int t = 0; t < Q; ++t) {
      from_start *= 1.0f - thetas[t * SLOTS + i];
      queries[t * SLOTS + i] = weights[t * SLOTS + i] * from_start;
    }
    float to_end = 1.0f;
    for (int t = Q - 1; t >= 0; --t) {
      keys[i * Q + t] = thetas[t * SLOTS + i] * to_end;
      to_end *= 1.0f - thetas[t * SLOTS + i];
    }
    for (uint c = 0; c < 8; ++c) {
      chunk_decay[i * Q + c] = c == i % 8 ? from_start : 0.0f;
    }
  }
  for (uint k = thread_index; k < Q * Q; k += thread_count) {
    const uint t = k / Q, s = k % Q;
    float score = 0.0f;
    for (uint i = 0; s <= t && i < SLOTS; ++i) {
      float decay = 1.0f;
      for (uint u = s + 1; u <= t; ++u) {
        decay *= 1.0f - thetas[u * SLOTS + i];
      }
      score += weights[t * SLOTS + i] * thetas[s * SLOTS + i] * decay;
    }
    scores[k] = score;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  simdgroup_float8x8 tokens, pairs, read, factor, update;
  simdgroup_load(tokens, values + tile * Q * 8, 8);
  simdgroup_load(pairs, scores, Q);
  simdgroup_multiply(read, pairs, tokens);
  for (int b = 0; b < BLOCKS; ++b) {
    simdgroup_load(factor, queries, SLOTS, ulong2(8 * b, 0));
    simdgroup_multiply_accumulate(read, factor, state_blocks[b], read);
    simdgroup_load(factor, chunk_decay, Q, ulong2(0, 8 * b));
    simdgroup_load(update, keys, Q, ulong2(0, 8 * b));
    simdgroup_multiply(state_blocks[b], factor, state_blocks[b]);
    simdgroup_multiply_accumulate(state_blocks[b], update, tokens, state_blocks[b]);
  }
  simdgroup_store(read, tile_stage, 8);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint k = lane; k < 64; k += 32) {
    const uint t = k / 8, column = first_column + k % 8;
    if (start + t < length && column < width) {
      reads[(first_token + ulong(t) * heads) * width + column] = tile_stage[k];
    }
  }
}

for (int b = 0; b < BLOCKS; ++b) {
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(state_blocks[b], tile_stage, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint k = lane; k < 64; k += 32) {
    const uint i = 8 * b + k / 8, column = first_column + k % 8;
    if (i < M && column < width) {
      final_state[(ulong(head_row) * M + i) * width + column] = tile_stage[k];
    }
  }
}
