// FM scan, backward: chunks in reverse, each recomputed forward from its
// checkpoint into registers, then walked back token by token.
//
// Same layout as the forward (one SIMD group per value column, lanes over
// slots), COLUMNS SIMD groups per threadgroup. With g = ∂L/∂M_t (adjoint):
//   g     += α̃_t ⊗ dr_t
//   dx_t   = Σ_i θ_i g[i]                                  (simd_sum)
//   dα̃_t,i = Σ_p dr_t[p] M_t[i,p] + η_t Σ_p g[i,p] (x_t[p] − M_{t−1}[i,p])
//   dη_t   = Σ_i α̃_i Σ_p g[i,p] (x_t[p] − M_{t−1}[i,p])
//   g     ← (1 − θ) ⊙ g
// Sums over p are done per threadgroup (its COLUMNS columns); the partial sums
// of the B = ceil(P / COLUMNS) threadgroups are added by the caller.
// Template: M slots, CHUNK (as in the forward), COLUMNS.
// Inputs: x, slot_weights, eta as in the forward; checkpoints (B, H, N, P, M);
// d_reads (B, T, H, P) float32; d_final_state (B, H, M, P) float32.
// Outputs: d_x (B, T, H, P); d_slot_weights_partial (B, T, H, B, M);
// d_eta_partial (B, T, H, B); d_state (B, H, M, P), all float32.

constexpr int SLOTS_PER_LANE = (M + 31) / 32;
const uint lane = thread_index_in_simdgroup;
const uint simd_group = simdgroup_index_in_threadgroup;
const uint simd_groups = simdgroups_per_threadgroup;
const uint thread_rank = simd_group * 32 + lane;
const uint thread_count = simd_groups * 32;
const uint column = thread_position_in_grid.y;
const uint head_row = thread_position_in_grid.z;  // batch * H + head
const uint block = threadgroup_position_in_grid.y;
const uint blocks = threadgroups_per_grid.y;
const uint length = x_shape[1];
const uint heads = x_shape[2];
const uint width = x_shape[3];
const uint batch = head_row / heads;
const uint head = head_row % heads;
const uint chunks = (length + CHUNK - 1) / CHUNK;

// Double-buffered so that one barrier per token suffices.
threadgroup float slot_partials[2][COLUMNS * M];
threadgroup float eta_partials[2][COLUMNS];
uint parity = 0;

float adjoint[SLOTS_PER_LANE];
for (int j = 0; j < SLOTS_PER_LANE; ++j) {
  const uint i = lane + 32 * j;
  adjoint[j] = i < M ? d_final_state[(ulong(head_row) * M + i) * width + column] : 0.0f;
}
// history[q] is the state after the chunk's q-th token; history[0] entering it.
float history[CHUNK + 1][SLOTS_PER_LANE];

for (int chunk = int(chunks) - 1; chunk >= 0; --chunk) {
  const uint start = chunk * CHUNK;
  const uint end = min(start + CHUNK, length);
  // `auto`: MLX passes an input of fewer than 8 elements as a `constant` buffer.
  auto checkpoint = checkpoints + ((ulong(head_row) * chunks + chunk) * width + column) * M;
  for (int j = 0; j < SLOTS_PER_LANE; ++j) {
    const uint i = lane + 32 * j;
    history[0][j] = i < M ? checkpoint[i] : 0.0f;
  }
  for (uint t = start; t < end; ++t) {
    // 64-bit: B·T·H·M passes 2^32 from about a million tokens.
    const ulong token = (ulong(batch) * length + t) * heads + head;
    const float eta_t = eta[token];
    const float value = float(x[token * width + column]);
    for (int j = 0; j < SLOTS_PER_LANE; ++j) {
      const uint i = lane + 32 * j;
      const float theta = i < M ? eta_t * slot_weights[token * M + i] : 0.0f;
      history[t - start + 1][j] = (1.0f - theta) * history[t - start][j] + theta * value;
    }
  }

  for (uint t = end; t-- > start;) {
    const uint q = t - start;
    const ulong token = (ulong(batch) * length + t) * heads + head;
    const float eta_t = eta[token];
    const float value = float(x[token * width + column]);
    const float d_read = d_reads[token * width + column];
    float d_value = 0.0f;
    float d_eta = 0.0f;
    for (int j = 0; j < SLOTS_PER_LANE; ++j) {
      const uint i = lane + 32 * j;
      if (i < M) {
        const float slot_weight = slot_weights[token * M + i];
        const float theta = eta_t * slot_weight;
        adjoint[j] += slot_weight * d_read;
        const float d_theta = adjoint[j] * (value - history[q][j]);
        slot_partials[parity][simd_group * M + i] = d_read * history[q + 1][j] + eta_t * d_theta;
        d_eta += slot_weight * d_theta;
        d_value += theta * adjoint[j];
        adjoint[j] *= 1.0f - theta;
      }
    }
    d_value = simd_sum(d_value);
    d_eta = simd_sum(d_eta);
    if (lane == 0) {
      d_x[token * width + column] = d_value;
      eta_partials[parity][simd_group] = d_eta;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = thread_rank; i < M; i += thread_count) {
      float total = 0.0f;
      for (uint g = 0; g < simd_groups; ++g) {
        total += slot_partials[parity][g * M + i];
      }
      d_slot_weights_partial[(token * blocks + block) * M + i] = total;
    }
    if (thread_rank == 0) {
      float total = 0.0f;
      for (uint g = 0; g < simd_groups; ++g) {
        total += eta_partials[parity][g];
      }
      d_eta_partial[token * blocks + block] = total;
    }
    parity ^= 1;
  }
}

for (int j = 0; j < SLOTS_PER_LANE; ++j) {
  const uint i = lane + 32 * j;
  if (i < M) {
    d_state[(ulong(head_row) * M + i) * width + column] = adjoint[j];
  }
}
