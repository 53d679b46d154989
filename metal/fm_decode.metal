// FM decode step: route, gate, write the selected slots, read, merge (docs/SPEC.md).
//
// One threadgroup per (batch, head), laid out as COLUMNS value columns by
// ROW_GROUPS slot groups. Template: M slots, K top-k (K == M is dense),
// COLUMNS, ROW_GROUPS.
// Inputs: x (B, H, P) any float type; router_logits (B, H, M); update_logits,
// merge_logits (B, H); eta_bias, mu_bias (H); temperature (scalar float);
// state (B, H, M, P) float32; mask (B) bool, false leaves the state unchanged.
// Outputs: out (B, H, P) float32, new_state (B, H, M, P) float32.
// Unselected slots are copied unchanged; only the K selected ones are updated.

const uint column_lane = thread_position_in_threadgroup.x;
const uint row_group = thread_position_in_threadgroup.y;
const uint thread_rank = row_group * COLUMNS + column_lane;
const uint thread_count = COLUMNS * ROW_GROUPS;
const uint head_row = threadgroup_position_in_grid.z;  // batch * H + head
const uint heads = x_shape[1];
const uint width = x_shape[2];
const uint batch = head_row / heads;
const uint head = head_row % heads;

threadgroup float slot_logits[M];
threadgroup float slot_weights[M];
threadgroup float partial_reads[ROW_GROUPS * COLUMNS];

for (uint i = thread_rank; i < M; i += thread_count) {
  slot_logits[i] = float(router_logits[head_row * M + i]) / temperature;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float largest = slot_logits[0];
for (uint j = 1; j < M; ++j) {
  largest = max(largest, slot_logits[j]);
}
for (uint i = thread_rank; i < M; i += thread_count) {
  const float logit = slot_logits[i];
  bool selected = true;
  if (K < M) {
    // Slot i is among the top K when fewer than K slots rank above it
    // (ties go to the lower index).
    uint rank = 0;
    for (uint j = 0; j < M; ++j) {
      const float other = slot_logits[j];
      rank += (other > logit || (other == logit && j < i)) ? 1 : 0;
    }
    selected = rank < K;
  }
  slot_weights[i] = selected ? exp(logit - largest) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float total = 0.0f;
for (uint j = 0; j < M; ++j) {
  total += slot_weights[j];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint i = thread_rank; i < M; i += thread_count) {
  slot_weights[i] /= total;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const float eta = mask[batch]
    ? 1.0f / (1.0f + exp(-(float(update_logits[head_row]) + float(eta_bias[head]))))
    : 0.0f;
const float mu = 1.0f / (1.0f + exp(-(float(merge_logits[head_row]) + float(mu_bias[head]))));

// `auto`: MLX passes an input of fewer than 8 elements as a `constant` buffer.
auto head_state = state + ulong(head_row) * M * width;
device float* head_new_state = new_state + ulong(head_row) * M * width;
for (uint first_column = 0; first_column < width; first_column += COLUMNS) {
  const uint column = first_column + column_lane;
  float read = 0.0f;
  float value = 0.0f;
  if (column < width) {
    value = float(x[head_row * width + column]);
    for (uint i = row_group; i < M; i += ROW_GROUPS) {
      float slot_value = head_state[i * width + column];
      const float slot_weight = slot_weights[i];
      if (slot_weight != 0.0f) {
        const float theta = eta * slot_weight;
        slot_value = (1.0f - theta) * slot_value + theta * value;
        read += slot_weight * slot_value;
      }
      head_new_state[i * width + column] = slot_value;
    }
  }
  partial_reads[thread_rank] = read;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (row_group == 0 && column < width) {
    for (uint g = 1; g < ROW_GROUPS; ++g) {
      read += partial_reads[g * COLUMNS + column_lane];
    }
    out[head_row * width + column] = mu * read + (1.0f - mu) * value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
