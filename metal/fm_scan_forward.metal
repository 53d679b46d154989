// FM scan, forward: the step recurrence over T tokens with the state on chip.
//
// One SIMD group per (batch, head, value column p); lane l holds the slots
// l, l + 32, ... of column p in registers, so the read Σ_i α̃_i M[i, p] is one
// simd_sum. Template: M slots, CHUNK tokens between saved states.
// Inputs: x (B, T, H, P) any float type; slot_weights α̃ (B, T, H, M) float32;
// eta (B, T, H) float32, zero for padding; state (B, H, M, P) float32.
// Outputs: reads (B, T, H, P); final_state (B, H, M, P); checkpoints
// (B, H, N, P, M) with N = ceil(T / CHUNK): the state entering each chunk,
// slot-minor so that the lanes' stores are contiguous. The header defines
// FM_SCAN_CHECKPOINTS: 0 builds the inference variant, without the
// checkpoints output and its writes.

constexpr int SLOTS_PER_LANE = (M + 31) / 32;
const uint lane = thread_index_in_simdgroup;
const uint column = thread_position_in_grid.y;
const uint head_row = thread_position_in_grid.z;  // batch * H + head
const uint length = x_shape[1];
const uint heads = x_shape[2];
const uint width = x_shape[3];
const uint batch = head_row / heads;
const uint head = head_row % heads;

float slot_state[SLOTS_PER_LANE];
for (int j = 0; j < SLOTS_PER_LANE; ++j) {
  const uint i = lane + 32 * j;
  slot_state[j] = i < M ? state[(ulong(head_row) * M + i) * width + column] : 0.0f;
}

for (uint t = 0; t < length; ++t) {
#if FM_SCAN_CHECKPOINTS
  if (t % CHUNK == 0) {
    const uint chunks = (length + CHUNK - 1) / CHUNK;
    device float* checkpoint =
        checkpoints + ((ulong(head_row) * chunks + t / CHUNK) * width + column) * M;
    for (int j = 0; j < SLOTS_PER_LANE; ++j) {
      const uint i = lane + 32 * j;
      if (i < M) {
        checkpoint[i] = slot_state[j];
      }
    }
  }
#endif
  // 64-bit: B·T·H·M passes 2^32 from about a million tokens.
  const ulong token = (ulong(batch) * length + t) * heads + head;
  const float eta_t = eta[token];
  const float value = float(x[token * width + column]);
  float read = 0.0f;
  for (int j = 0; j < SLOTS_PER_LANE; ++j) {
    const uint i = lane + 32 * j;
    if (i < M) {
      const float slot_weight = slot_weights[token * M + i];
      const float theta = eta_t * slot_weight;
      slot_state[j] = (1.0f - theta) * slot_state[j] + theta * value;
      read += slot_weight * slot_state[j];
    }
  }
  read = simd_sum(read);
  if (lane == 0) {
    reads[token * width + column] = read;
  }
}

for (int j = 0; j < SLOTS_PER_LANE; ++j) {
  const uint i = lane + 32 * j;
  if (i < M) {
    final_state[(ulong(head_row) * M + i) * width + column] = slot_state[j];
  }
}
