// FM scan, backward, chunkwise-parallel: the chunks of fm_scan_chunkwise.metal
// in reverse, each from the state S its checkpointing variant saved entering
// it, as 8 x 8 matrix products; G, the adjoint of the state leaving the chunk,
// is passed from chunk to chunk.
//
// Per chunk, with the forward's A, α̃ ⊙ F, θ ⊙ E and F_last, and dR the reads' adjoint:
//   dX = Aᵀ · dR + (θ ⊙ E) · G
//   G ← diag(F_last) · G + (α̃ ⊙ F)ᵀ · dR       (after the first chunk: d_state)
// With M_t the state after token t, M_{-1} = S, and g_t its adjoint, the slot
// weights and η get, per token t and slot i (the step backward's terms),
//   dq = dr_t · M_t[i],  dk = g_t[i] · x_t,  da = g_t[i] · M_{t−1}[i],
//   dθ = dk − da,  dα̃ = dq + η dθ,  dη = Σ_i α̃_i dθ_i.
// M_t and g_t are never formed: each term is a sum of decay products times the
// column sums Z = S · dRᵀ, W = G · Xᵀ, V = diag(G · Sᵀ) and C = X · dRᵀ, which
// the matrix units give; then one lane per slot combines them token by token.
// Decays are products of numbers in [0, 1], never quotients.
//
// One threadgroup per (batch, head, group of COLUMN_TILES tiles of 8 value
// columns), as the forward; SIMD group g owns tile g, keeps its G (SLOTS x 8)
// as SLOTS / 8 matrices, and writes the sums over its 8 columns of dα̃ and dη;
// the caller adds those of the ceil(P / 8) tiles (and of empty tiles past P).
// Template: M slots, SLOTS = M rounded up to 8, COLUMN_TILES.
// Inputs: x, slot_weights, eta as the forward; checkpoints (B, H, N, M, P)
// from the forward, N = ceil(T / 8); d_reads (B, T, H, P) float32;
// d_final_state (B, H, M, P) float32.
// Outputs: d_x (B, T, H, P); d_slot_weights_partial (B, T, H, tiles, M);
// d_eta_partial (B, T, H, tiles); d_state (B, H, M, P), all float32.

constexpr int Q = 8;  // tokens per chunk: one matrix tile
constexpr int BLOCKS = SLOTS / 8;
constexpr int WINDOW = 4;  // blocks of 8 slots whose column sums are staged at once: a slot per lane
threadgroup float weights[Q * SLOTS];         // α̃[t][i]
threadgroup float thetas[Q * SLOTS];          // θ[t][i]
threadgroup float queries[Q * SLOTS];         // α̃ ⊙ F, [t][i]
threadgroup float keys[SLOTS * Q];            // (θ ⊙ E)ᵀ, [i][t]
threadgroup float chunk_decay[SLOTS * Q];     // diag(F_last) by blocks: [i][i % 8]
threadgroup float scores[Q * Q];              // A[t][s]
threadgroup float etas[Q];
threadgroup float values[COLUMN_TILES * Q * 8];    // X of each tile, [t][column]
threadgroup float d_values[COLUMN_TILES * Q * 8];  // dR of each tile, [t][column]
threadgroup float staged[COLUMN_TILES * 64];       // each SIMD group's 8 x 8 exchange
threadgroup float token_sums[COLUMN_TILES * Q * Q];        // C[s][t] = x_s · dr_t
threadgroup float state_sums[COLUMN_TILES * WINDOW * 64];  // Z[i][t] = S[i] · dr_t
threadgroup float adjoint_sums[COLUMN_TILES * WINDOW * 64];  // W[i][t] = G[i] · x_t
threadgroup float diagonal_sums[COLUMN_TILES * WINDOW * 8];  // V[i] = G[i] · S[i]

const uint lane = thread_index_in_simdgroup;
const uint tile = simdgroup_index_in_threadgroup;
const uint thread_index = thread_index_in_threadgroup;
const uint thread_count = threads_per_threadgroup.x * threads_per_threadgroup.y;
const uint head_row = threadgroup_position_in_grid.z;  // batch * H + head
const uint tile_index = threadgroup_position_in_grid.y * COLUMN_TILES + tile;  // in the head
const uint tiles = threadgroups_per_grid.y * COLUMN_TILES;
const uint first_column = tile_index * 8;
const uint length = x_shape[1];
const uint heads = x_shape[2];
const uint width = x_shape[3];
const uint batch = head_row / heads;
const uint head = head_row % heads;
const uint chunks = (length + Q - 1) / Q;
threadgroup float* tile_stage = staged + tile * 64;
threadgroup float* tile_values = values + tile * Q * 8;
threadgroup float* tile_d_values = d_values + tile * Q * 8;
threadgroup float* tile_token_sums = token_sums + tile * Q * Q;
threadgroup float* tile_state_sums = state_sums + tile * WINDOW * 64;
threadgroup float* tile_adjoint_sums = adjoint_sums + tile * WINDOW * 64;
threadgroup float* tile_diagonal_sums = diagonal_sums + tile * WINDOW * 8;

simdgroup_float8x8 adjoint_blocks[BLOCKS];
for (int b = 0; b < BLOCKS; ++b) {
  for (uint k = lane; k < 64; k += 32) {
    const uint i = 8 * b + k / 8, column = first_column + k % 8;
    tile_stage[k] =
        i < M && column < width ? d_final_state[(ulong(head_row) * M + i) * width + column] : 0.0f;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_load(adjoint_blocks[b], tile_stage, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

for (uint chunk = chunks; chunk-- > 0;) {
  const uint start = chunk * Q;
  // 64-bit: B·T·H·M passes 2^32 from about a million tokens.
  const ulong first_token = (ulong(batch) * length + start) * heads + head;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the chunk after this one is done
  for (uint k = thread_index; k < Q * SLOTS; k += thread_count) {
    const uint t = k / SLOTS, i = k % SLOTS;
    const bool present = start + t < length && i < M;
    const ulong token = first_token + ulong(t) * heads;
    const float weight = present ? slot_weights[token * M + i] : 0.0f;
    weights[k] = weight;
    thetas[k] = present ? eta[token] * weight : 0.0f;
  }
  for (uint t = thread_index; t < Q; t += thread_count) {
    etas[t] = start + t < length ? eta[first_token + ulong(t) * heads] : 0.0f;
  }
  for (uint k = thread_index; k < COLUMN_TILES * Q * 8; k += thread_count) {
    const uint t = (k / 8) % Q, column = (threadgroup_position_in_grid.y * COLUMN_TILES + k / 64) * 8 + k % 8;
    const ulong token = first_token + ulong(t) * heads;
    const bool present = start + t < length && column < width;
    values[k] = present ? float(x[token * width + column]) : 0.0f;
    d_values[k] = present ? d_reads[token * width + column] : 0.0f;
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

  // Transposed loads take their block by a pointer offset with origin (0, 0): whether an
  // origin counts in the source's or the transposed matrix's coordinates is then moot.
  simdgroup_float8x8 tokens, token_columns, d_read_rows, d_read_columns, d_tokens;
  simdgroup_float8x8 slot_state, slot_state_columns, product, factor;
  simdgroup_load(tokens, tile_values, 8);
  simdgroup_load(token_columns, tile_values, 8, ulong2(0, 0), true);
  simdgroup_load(d_read_rows, tile_d_values, 8);
  simdgroup_load(d_read_columns, tile_d_values, 8, ulong2(0, 0), true);
  simdgroup_multiply(product, tokens, d_read_columns);
  simdgroup_store(product, tile_token_sums, Q);
  simdgroup_load(factor, scores, Q, ulong2(0, 0), true);  // Aᵀ
  simdgroup_multiply(d_tokens, factor, d_read_rows);
  float d_eta_sums[Q];
  for (int t = 0; t < Q; ++t) {
    d_eta_sums[t] = 0.0f;
  }
  // `auto`: MLX passes an input of fewer than 8 elements as a `constant` buffer.
  auto checkpoint = checkpoints + (ulong(head_row) * chunks + chunk) * M * width;
  for (int b = 0; b < BLOCKS; ++b) {
    const int window_block = b % WINDOW;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (uint k = lane; k < 64; k += 32) {
      const uint i = 8 * b + k / 8, column = first_column + k % 8;
      tile_stage[k] = i < M && column < width ? checkpoint[ulong(i) * width + column] : 0.0f;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(slot_state, tile_stage, 8);
    simdgroup_load(slot_state_columns, tile_stage, 8, ulong2(0, 0), true);
    simdgroup_multiply(product, slot_state, d_read_columns);
    simdgroup_store(product, tile_state_sums + 64 * window_block, 8);
    simdgroup_multiply(product, adjoint_blocks[b], token_columns);
    simdgroup_store(product, tile_adjoint_sums + 64 * window_block, 8);
    simdgroup_multiply(product, adjoint_blocks[b], slot_state_columns);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(product, tile_stage, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    if (lane < 8) {
      tile_diagonal_sums[8 * window_block + lane] = tile_stage[9 * lane];
    }

    simdgroup_load(factor, keys + 8 * b * Q, Q, ulong2(0, 0), true);  // θ ⊙ E, [t][i]
    simdgroup_multiply_accumulate(d_tokens, factor, adjoint_blocks[b], d_tokens);
    simdgroup_load(factor, chunk_decay + 8 * b * Q, Q);
    simdgroup_multiply(adjoint_blocks[b], factor, adjoint_blocks[b]);
    simdgroup_load(factor, queries + 8 * b, SLOTS, ulong2(0, 0), true);  // (α̃ ⊙ F)ᵀ, [i][t]
    simdgroup_multiply_accumulate(adjoint_blocks[b], factor, d_read_rows, adjoint_blocks[b]);

    if (window_block < WINDOW - 1 && b < BLOCKS - 1) {
      continue;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    const uint i = 8 * (b - window_block) + lane;
    if (lane < 8 * uint(window_block + 1) && i < M) {
      // With a_u = 1 − θ_u and D(s, t) = Π_{s<u≤t} a_u,
      //   M_t = D(−1, t) S + Σ_{s≤t} D(s, t) θ_s x_s,  g_t = D(t, Q − 1) G + Σ_{u≥t} D(t, u) α̃_u dr_u.
      // Entering step t: from_start = D(−1, t − 1), written = Σ_{s<t} D(s, t − 1) θ_s W[s],
      // carried[u] = Σ_{s<t} D(s, t − 1) θ_s C[s][u]; then updated to include s = t.
      const threadgroup float* state_sum = tile_state_sums + 8 * lane;
      const threadgroup float* adjoint_sum = tile_adjoint_sums + 8 * lane;
      const float diagonal_sum = tile_diagonal_sums[lane];
      float carried[Q];
      for (int u = 0; u < Q; ++u) {
        carried[u] = 0.0f;
      }
      float from_start = 1.0f;
      float written = 0.0f;
      for (int t = 0; t < Q; ++t) {
        // Σ_{u≥t} D(t, u) α̃_u times Z[u], C[t][u] and carried[u]; decay ends as D(t, Q − 1).
        float decay = 1.0f;
        float via_state = 0.0f, via_token = 0.0f, via_carried = 0.0f;
        for (int u = t; u < Q; ++u) {
          decay *= u > t ? 1.0f - thetas[u * SLOTS + i] : 1.0f;
          const float reader = decay * weights[u * SLOTS + i];
          via_state += reader * state_sum[u];
          via_token += reader * tile_token_sums[t * Q + u];
          via_carried += reader * carried[u];
        }
        const float d_decay =
            decay * (from_start * diagonal_sum + written) + from_start * via_state + via_carried;
        const float d_key = decay * adjoint_sum[t] + via_token;
        const float theta = thetas[t * SLOTS + i];
        written = (1.0f - theta) * written + theta * adjoint_sum[t];
        for (int u = 0; u < Q; ++u) {
          carried[u] = (1.0f - theta) * carried[u] + theta * tile_token_sums[t * Q + u];
        }
        from_start *= 1.0f - theta;
        const float d_query = from_start * state_sum[t] + carried[t];
        const float d_theta = d_key - d_decay;
        d_eta_sums[t] += weights[t * SLOTS + i] * d_theta;
        if (start + t < length) {
          const ulong token = first_token + ulong(t) * heads;
          d_slot_weights_partial[(token * tiles + tile_index) * M + i] = d_query + etas[t] * d_theta;
        }
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (int t = 0; t < Q; ++t) {
    const float d_eta_sum = simd_sum(d_eta_sums[t]);
    if (lane == 0 && start + t < length) {
      d_eta_partial[(first_token + ulong(t) * heads) * tiles + tile_index] = d_eta_sum;
    }
  }
  simdgroup_store(d_tokens, tile_stage, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint k = lane; k < 64; k += 32) {
    const uint t = k / 8, column = first_column + k % 8;
    if (start + t < length && column < width) {
      d_x[(first_token + ulong(t) * heads) * width + column] = tile_stage[k];
    }
  }
}

for (int b = 0; b < BLOCKS; ++b) {
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(adjoint_blocks[b], tile_stage, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint k = lane; k < 64; k += 32) {
    const uint i = 8 * b + k / 8, column = first_column + k % 8;
    if (i < M && column < width) {
      d_state[(ulong(head_row) * M + i) * width + column] = tile_stage[k];
    }
  }
}
