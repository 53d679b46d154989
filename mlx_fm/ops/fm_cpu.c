/* The FM mixer's elementwise and recurrent work in C, for inference on the CPU
   (mlx_fm/ops/native.py): the causal conv with SiLU, the mix, and the gated RMSNorm. Each splits
   its work among `threads` threads; a share whose thread cannot be started runs on this one.
   And fm_decode (at the end): a decode step of the whole model, on those.

   fm_mix: the core (route, gates, write, read, merge: docs/SPEC.md), per token and head: the
   slot weights are the softmax of the top_k router logits / τ (ties go to the lower slot),
   η = sigmoid(update + η bias) (0 for a masked token), μ = sigmoid(merge + μ bias); every slot
   with a nonzero weight a decays by θ = η·a and takes θ·x̄; the read is Σ a·slot over those
   slots, after the write; the output is μ·read + (1 − μ)·x̄. Slots with a = 0 are skipped, so
   they stay bit for bit as they were. The heads are independent and are shared among
   `threads` threads. Layouts, float32, contiguous: x and out (B, T, H, P), biases (H), mask
   (B, T) bytes or null, state (B, H, m, P) updated in place; router (B, T, H, m), update and
   merge (B, T, H) need only be contiguous within a token: strides[0..2] are the floats from one
   token's to the next's (columns of one projection, read where they lie); snapshots null, or
   (keep, B, H, m, P) for the state before each of the last keep tokens. A decode step may also
   keep what it overwrites (Share's written and overwritten: see fm_decode). */

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

typedef float floats8 __attribute__((vector_size(32)));
typedef int ints8 __attribute__((vector_size(32)));
typedef float floats4 __attribute__((vector_size(16)));
typedef int ints4 __attribute__((vector_size(16)));
#define LANES 4 /* heads routed at once: an ints4's lanes */

/* The loops of a prompt's mixer and of a decode step are built twice on x86-64: for any x86-64
   CPU, and for one with AVX2 and FMA, taken where the CPU has them (exp_approx, the conv and the
   norms run 8 floats at a time there, not 4: 2–3× as fast), unless fm_portable_only(1) said not
   to (tests run both). Elsewhere (arm64 always has NEON) once. ON_THIS_CPU(name) defines
   name(share) as name_portable(share), built either way. */
#define INLINE static inline __attribute__((always_inline))
static int portable_only;
void fm_portable_only(int on) { portable_only = on; }
#if defined(__x86_64__)
#define VECTOR_TARGET __attribute__((target("avx2,fma")))
static int has_vector_units(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#define ON_THIS_CPU(name)                                                                          \
    VECTOR_TARGET static void *name##_vector(void *share) { return name##_portable(share); }     \
    static void *name(void *share) {                                                               \
        if (!portable_only && has_vector_units())                                                  \
            return name##_vector(share);                                                           \
        return name##_portable(share);                                                             \
    }
#else
#define VECTOR_TARGET
static int has_vector_units(void) { return 0; }
#define ON_THIS_CPU(name)                                                                          \
    static void *name(void *share) { return name##_portable(share); }
#endif

typedef struct {
    long batch, length, heads, slots, width, top_k, first, last; /* heads first..last−1 */
    float temperature;
    const float *x, *router, *update, *merge, *eta_bias, *mu_bias;
    long router_stride, update_stride, merge_stride; /* floats from a token's to the next's */
    const unsigned char *mask;
    float *state, *out;
    int *written;       /* null, or (heads, top_k): the slots each head writes */
    float *overwritten; /* with written: (heads, top_k, width), their rows before */
    float *snapshots;   /* null, or (keep, B, H, m, P): the state before each of the last keep */
    long keep;          /* tokens */
    ints4 *top;         /* scratch for route (from share_scratch) */
    long *chosen;
    float *weights;
} Share;

static long min_long(long a, long b) { return a < b ? a : b; }

/* Gives a share SCRATCH_BYTES(top_k) of scratch for route, from `scratch`, 16-byte aligned
   (as malloc's). */
#define SCRATCH_BYTES(top_k)                                                                       \
    ((top_k) * (2 * sizeof(ints4) + LANES * (sizeof(long) + sizeof(float))))
static void share_scratch(Share *s, char *scratch) {
    s->top = (ints4 *)scratch;
    s->chosen = (long *)(s->top + 2 * s->top_k);
    s->weights = (float *)(s->chosen + LANES * s->top_k);
}

INLINE float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* Routes up to LANES heads of token `at`, from `head` on (`count` of them): for each, the top_k
   slots by router logit / τ (of equal logits, the lower slot first), from the highest, into
   chosen, and the softmax of their logits into weights, in the same order (chosen and weights:
   LANES · top_k, a head's after the one before). The heads go through a list of the largest so
   far in lockstep, one head a vector lane: each slot is carried down the list, swapping places
   with any smaller entry, without a branch (an insertion sort's mispredicted on most tokens);
   a slot that would enter no lane's list is skipped.
   Logits become integer keys in the same order: −0 counts as +0, a NaN of either sign as +∞ (so
   that its head's output is NaN, as on MLX ops), and an empty entry is below every key. */
INLINE void route(const Share *s, long at, long head, long count, long *chosen, float *weights) {
    long slots = s->slots, k = s->top_k;
    const float *rows[LANES];
    for (long lane = 0; lane < LANES; lane++) /* a lane past the last head repeats it */
        rows[lane] = s->router + at * s->router_stride + (head + min_long(lane, count - 1)) * slots;
    ints4 *top = s->top, *top_slots = s->top + k;
    for (long j = 0; j < k; j++) {
        top[j] = (ints4){0} + INT_MIN;
        top_slots[j] = (ints4){0};
    }
    for (long i = 0; i < slots; i++) {
        floats4 logit = {rows[0][i], rows[1][i], rows[2][i], rows[3][i]};
        if (s->temperature != 1.0f)
            logit = logit / s->temperature;
        ints4 bits = (ints4)logit, nan = logit != logit;
        bits = (bits & ~(nan | (logit == 0.0f))) | (nan & 0x7F800000);
        ints4 key = bits ^ ((bits >> 31) & 0x7FFFFFFF), slot = (ints4){0} + (int)i;
        ints4 enters = key > top[k - 1];
        if (k < slots && !(enters[0] | enters[1] | enters[2] | enters[3]))
            continue;
        for (long j = 0; j < k; j++) {
            ints4 kept = top[j], kept_slot = top_slots[j], swap = key > kept;
            top[j] = (key & swap) | (kept & ~swap);
            top_slots[j] = (slot & swap) | (kept_slot & ~swap);
            key = (kept & swap) | (key & ~swap);
            slot = (kept_slot & swap) | (slot & ~swap);
        }
    }
    for (long lane = 0; lane < count; lane++) { /* from the largest */
        float *w = weights + lane * k, total = 0.0f;
        for (long j = 0; j < k; j++) {
            int key = top[j][lane], bits = key ^ ((key >> 31) & 0x7FFFFFFF);
            memcpy(&w[j], &bits, sizeof bits);
            chosen[lane * k + j] = top_slots[j][lane];
        }
        float largest = w[0];
        for (long j = 0; j < k; j++)
            total += w[j] = expf(w[j] - largest);
        for (long j = 0; j < k; j++)
            w[j] /= total;
    }
}

/* Writes, reads and merges head `head` of token t of `row`, on the slots route chose. */
INLINE void mix_token(const Share *s, long row, long t, long head, const long *chosen,
                      const float *weights) {
    long width = s->width, at = row * s->length + t, token = at * s->heads + head;
    float *state = s->state + (row * s->heads + head) * s->slots * width;
    const float *restrict x = s->x + token * width;
    float *restrict out = s->out + token * width;
    float eta = sigmoid(s->update[at * s->update_stride + head] + s->eta_bias[head]);
    if (s->mask && !s->mask[at])
        eta = 0.0f;
    for (long p = 0; p < width; p++)
        out[p] = 0.0f;
    if (s->written) {
        for (long j = 0; j < s->top_k; j++) {
            s->written[head * s->top_k + j] = (int)chosen[j];
            memcpy(s->overwritten + (head * s->top_k + j) * width, state + chosen[j] * width,
                   width * sizeof(float));
        }
    }
    for (long j = 0; j < s->top_k; j++) {
        float weight = weights[j];
        if (weight == 0.0f)
            continue;
        float theta = eta * weight, keep = 1.0f - theta;
        float *restrict slot = state + chosen[j] * width;
        for (long p = 0; p < width; p++) {
            slot[p] = keep * slot[p] + theta * x[p];
            out[p] += weight * slot[p];
        }
    }
    float mu = sigmoid(s->merge[at * s->merge_stride + head] + s->mu_bias[head]);
    for (long p = 0; p < width; p++)
        out[p] = mu * out[p] + (1.0f - mu) * x[p];
}

/* Token by token, this share's heads: consecutive memory, which the CPU prefetches. */
INLINE void *mix_share_portable(void *share) {
    const Share *s = share;
    long k = s->top_k, head_size = s->slots * s->width;
    for (long row = 0; row < s->batch; row++)
        for (long t = 0; t < s->length; t++) {
            long kept = t - (s->length - s->keep);
            if (s->snapshots && kept >= 0)
                memcpy(s->snapshots + ((kept * s->batch + row) * s->heads + s->first) * head_size,
                       s->state + (row * s->heads + s->first) * head_size,
                       (s->last - s->first) * head_size * sizeof(float));
            for (long head = s->first; head < s->last; head += LANES) {
                long count = min_long(LANES, s->last - head);
                route(s, row * s->length + t, head, count, s->chosen, s->weights);
                for (long lane = 0; lane < count; lane++)
                    mix_token(s, row, t, head + lane, s->chosen + lane * k, s->weights + lane * k);
            }
        }
    return 0;
}
ON_THIS_CPU(mix_share)

/* Runs work(share) for `count` shares of `size` bytes, each on a thread of its own but the
   first, which runs on this one (as does any whose thread cannot be started). */
static void run_shares(void *(*work)(void *), char *shares, size_t size, int count) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 1; k < count; k++)
        started[k] = pthread_create(&ids[k], 0, work, shares + k * size) == 0;
    work(shares);
    for (int k = 1; k < count; k++) {
        if (started[k])
            pthread_join(ids[k], 0);
        else
            work(shares + k * size);
    }
}

static int thread_count(int threads, long units) {
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > units)
        threads = (int)units;
    return threads < 1 ? 1 : threads;
}

/* Returns 0; or, with nothing written, 1 when scratch memory could not be had. */
int fm_mix(long batch, long length, long heads, long slots, long width, long top_k,
           float temperature, const float *x, const float *router, const float *update,
           const float *merge, const long *strides, const float *eta_bias, const float *mu_bias,
           const unsigned char *mask, float *state, float *out, float *snapshots, long keep,
           int threads) {
    threads = thread_count(threads, heads);
    char *scratch = malloc(threads * SCRATCH_BYTES(top_k));
    if (!scratch)
        return 1;
    Share shares[MAX_THREADS];
    for (int k = 0; k < threads; k++) {
        shares[k] = (Share){.batch = batch, .length = length, .heads = heads, .slots = slots,
                            .width = width, .top_k = top_k, .first = heads * k / threads,
                            .last = heads * (k + 1) / threads, .temperature = temperature,
                            .x = x, .router = router, .update = update, .merge = merge,
                            .eta_bias = eta_bias, .mu_bias = mu_bias, .router_stride = strides[0],
                            .update_stride = strides[1], .merge_stride = strides[2],
                            .mask = mask, .state = state, .out = out,
                            .snapshots = snapshots, .keep = keep};
        share_scratch(&shares[k], scratch + k * SCRATCH_BYTES(top_k));
    }
    run_shares(mix_share, (char *)shares, sizeof(Share), threads);
    free(scratch);
    return 0;
}

/* Rows first..last−1 of (rows, channels) arrays (of sequences of `length` tokens). */
typedef struct {
    long length, channels, taps, first, last;
    float eps;
    const float *in, *history, *weight, *bias, *gate;
    float *out;
    long stride; /* floats from a row of in (conv) or gate (gated norm) to the next */
} Rows;

/* e^v for v clipped to [−87, 87], as 2^n · e^r with n = round(v / ln 2) and e^r from its Taylor
   series to r^6 (relative error < 3e-7, as mlx_fm/ops/activations.py's): only adds, multiplies
   and integer operations, which the compiler vectorizes, unlike a call to expf. */
INLINE float exp_approx(float v) {
    v = v > -87.0f ? v : -87.0f;
    v = v < 87.0f ? v : 87.0f;
    float rounded = v * 1.4426950408889634f + 12582912.0f; /* round(v / ln 2) in the low bits */
    float n = rounded - 12582912.0f;
    float r = v - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float power = 1.0f / 720;
    power = power * r + 1.0f / 120;
    power = power * r + 1.0f / 24;
    power = power * r + 1.0f / 6;
    power = power * r + 0.5f;
    power = power * r + 1.0f;
    power = power * r + 1.0f;
    union { float f; int i; } bits = {rounded}, scale;
    scale.i = (bits.i - (0x4B400000 - 127)) << 23; /* 2^n: n + the float32 bias, as exponent */
    return power * scale.f;
}

INLINE float silu(float v) { return v / (1.0f + exp_approx(-v)); }

/* out[b, t, c] = SiLU(bias[c] + Σ_j weight[j, c] · window[b, t + j, c]), over the window of
   history (B, K−1, E), the K−1 inputs before the first token, then in, the T tokens (B·T rows,
   read where they lie: a row `stride` floats from the last); weight (K, E); rows = B·T. */
INLINE void *conv_rows_portable(void *share) {
    const Rows *s = share;
    long length = s->length, channels = s->channels, taps = s->taps;
    for (long row = s->first; row < s->last; row++) {
        long b = row / length, t = row % length;
        float *restrict out = s->out + row * channels;
        for (long c = 0; c < channels; c++)
            out[c] = s->bias[c];
        for (long j = 0; j < taps; j++) {
            long at = t + j - (taps - 1); /* the token in `in`, or before it in `history` */
            const float *restrict tap = at < 0
                                            ? s->history + (b * (taps - 1) + taps - 1 + at) * channels
                                            : s->in + (b * length + at) * s->stride;
            const float *restrict weight = s->weight + j * channels;
            for (long c = 0; c < channels; c++)
                out[c] += weight[c] * tap[c];
        }
        for (long c = 0; c < channels; c++)
            out[c] = silu(out[c]);
    }
    return 0;
}
ON_THIS_CPU(conv_rows)

void fm_conv_silu(long batch, long length, long channels, long taps, const float *history,
                  const float *in, long stride, const float *weight, const float *bias, float *out,
                  int threads) {
    long rows = batch * length;
    threads = thread_count(threads, rows);
    Rows shares[MAX_THREADS];
    for (int k = 0; k < threads; k++)
        shares[k] = (Rows){.length = length, .channels = channels, .taps = taps,
                           .first = rows * k / threads, .last = rows * (k + 1) / threads,
                           .in = in, .history = history, .weight = weight, .bias = bias,
                           .out = out, .stride = stride};
    run_shares(conv_rows, (char *)shares, sizeof(Rows), threads);
}

/* x = RMSNorm(x) · weight, in place, over `channels` values. */
INLINE void normalize(float *restrict x, const float *restrict weight, long channels, float eps) {
    float squares = 0.0f;
    for (long c = 0; c < channels; c++)
        squares += x[c] * x[c];
    float scale = 1.0f / sqrtf(squares / channels + eps);
    for (long c = 0; c < channels; c++)
        x[c] = x[c] * scale * weight[c];
}

/* out = RMSNorm(in ⊙ SiLU(gate)) · weight over each row of (rows, channels); a row of gate is
   `stride` floats from the last. */
INLINE void *gate_norm_rows_portable(void *share) {
    const Rows *s = share;
    long channels = s->channels;
    for (long row = s->first; row < s->last; row++) {
        const float *restrict in = s->in + row * channels;
        const float *restrict gate = s->gate + row * s->stride;
        float *restrict out = s->out + row * channels;
        for (long c = 0; c < channels; c++)
            out[c] = in[c] * silu(gate[c]);
        normalize(out, s->weight, channels, s->eps);
    }
    return 0;
}
ON_THIS_CPU(gate_norm_rows)

void fm_gate_norm(long rows, long channels, float eps, const float *in, const float *gate,
                  long gate_stride, const float *weight, float *out, int threads) {
    threads = thread_count(threads, rows);
    Rows shares[MAX_THREADS];
    for (int k = 0; k < threads; k++)
        shares[k] = (Rows){.channels = channels, .first = rows * k / threads,
                           .last = rows * (k + 1) / threads, .eps = eps, .in = in,
                           .weight = weight, .gate = gate, .out = out, .stride = gate_stride};
    run_shares(gate_norm_rows, (char *)shares, sizeof(Rows), threads);
}

/* A decode step of the whole model (mlx_fm/models/factorization_memory.py, Model._step): one
   token a row, for `batch` rows, every layer, the final norm and the output layer. The products
   go to `sgemm` (the cblas_sgemm MLX binds: mlx_fm/blas.py), the rest to the functions above,
   so a step does what a prompt's token does. Layouts, float32 and contiguous:
   - dims: DIMENSIONS longs, in their enum's order; tokens (B) in [0, vocab); mask (B) bytes or
     null;
   - weights: MODEL_WEIGHTS pointers, then LAYER_WEIGHTS a layer, each a PyTorch Linear's
     (out, in) matrix or a vector; the conv weight (K, E); null for a conv or MLP the model has
     not, and for a quantized matrix, whose entry in `quantized` (as long as weights) has it;
   - contents: each layer's state (B, H, m, P) and last K−1 conv inputs (B, K−1, E), updated
     in place (no conv inputs when K < 2);
   - written, overwritten, left: null, or what the step overwrites in the contents, to undo it
     by: the slots each layer writes (layers, B, H, top_k), their rows before (layers, B, H,
     top_k, P), and the conv input that leaves each layer's window (layers, B, E; null when
     K < 2);
   - logits (B, vocab). */

typedef void (*sgemm_function)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);

enum { HIDDEN, LAYERS, HEADS, SLOTS, WIDTH, TOP_K, TAPS, INTERMEDIATE, VOCAB, DIMENSIONS };
enum { EMBEDDINGS, FINAL_NORM, HEAD, MODEL_WEIGHTS };
enum {
    NORM, IN_PROJ, CONV_WEIGHT, CONV_BIAS, ETA_BIAS, MU_BIAS, MIXER_NORM, OUT_PROJ, MLP_NORM,
    GATE_PROJ, UP_PROJ, DOWN_PROJ, LAYER_WEIGHTS
};

/* A matrix (outputs, inputs) in MLX's affine quantization: weight ≈ scale · q + bias over
   groups of `group` inputs, each q `bits` bits, packed 32 / bits to a 32-bit word from the low
   bits up. A float matrix has no `packed`. */
typedef struct {
    const unsigned *packed;
    const float *scales, *biases;
    long bits, group;
} Quantized;


/* Whether quantized_product runs here at its speed: on x86-64 with AVX2 and FMA. Elsewhere the
   caller multiplies by float copies instead. */
int fm_quantized_products(void) { return has_vector_units(); }

/* y (outputs) = x (inputs) · dequantized(m)ᵀ, for group · bits a multiple of 256 (a group is a
   whole number of 8-word vectors). x is taken apart by place in a word (xp[j][k] is x[k · per
   word + j]), so that the j-th values of 8 words meet their x after one shift of all 8; a
   group's bias meets the sum of its x. scratch: inputs + inputs / group floats. */
VECTOR_TARGET static void quantized_product(const Quantized *m, long outputs, long inputs,
                                            const float *x, float *y, float *scratch) {
    long per_word = 32 / m->bits, words = inputs / per_word, groups = inputs / m->group;
    long group_words = m->group / per_word;
    int mask = (1 << m->bits) - 1;
    float *xp = scratch, *group_sums = scratch + inputs;
    for (long k = 0; k < words; k++)
        for (long j = 0; j < per_word; j++)
            xp[j * words + k] = x[k * per_word + j];
    for (long g = 0; g < groups; g++) {
        float sum = 0.0f;
        for (long i = 0; i < m->group; i++)
            sum += x[g * m->group + i];
        group_sums[g] = sum;
    }
    for (long o = 0; o < outputs; o++) {
        const unsigned *row = m->packed + o * words;
        const float *scales = m->scales + o * groups, *biases = m->biases + o * groups;
        float total = 0.0f;
        for (long g = 0; g < groups; g++) {
            floats8 dot = {0};
            for (long k = g * group_words; k < (g + 1) * group_words; k += 8) {
                ints8 packed;
                memcpy(&packed, row + k, sizeof packed);
                for (long j = 0; j < per_word; j++) {
                    floats8 xs;
                    memcpy(&xs, xp + j * words + k, sizeof xs);
                    dot += __builtin_convertvector((packed >> (int)(m->bits * j)) & mask, floats8) * xs;
                }
            }
            float sum = 0.0f;
            for (int lane = 0; lane < 8; lane++)
                sum += dot[lane];
            total += scales[g] * sum + biases[g] * group_sums[g];
        }
        y[o] = total;
    }
}

/* Row `row` of a quantized matrix of `inputs` columns, dequantized. */
static void dequantized_row(const Quantized *m, long row, long inputs, float *out) {
    long per_word = 32 / m->bits, groups = inputs / m->group;
    unsigned mask = (1u << m->bits) - 1;
    const unsigned *words = m->packed + row * (inputs / per_word);
    for (long i = 0; i < inputs; i++) {
        long g = row * groups + i / m->group;
        unsigned q = (words[i / per_word] >> (m->bits * (i % per_word))) & mask;
        out[i] = m->scales[g] * (float)q + m->biases[g];
    }
}

typedef struct {
    const Quantized *m;
    long inputs, first, last; /* rows first..last−1 */
    float *out;
} Dequantizing;

/* Rows of a quantized matrix dequantized, 8 words (one scale and bias: a whole number of them
   make a group) at a time: the j-th 8 values of those words take each lane's word by a
   shuffle and its place in the word by a shift. */
VECTOR_TARGET static void *dequantize_rows(void *share) {
    const Dequantizing *s = share;
    const Quantized *m = s->m;
    int bits = (int)m->bits, mask = (1 << bits) - 1, per_word = 32 / bits;
    long words = s->inputs / per_word, groups = s->inputs / m->group;
    long group_words = m->group / per_word;
    ints8 lanes = {0, 1, 2, 3, 4, 5, 6, 7}, word_of[32], shift_of[32];
    for (int j = 0; j < per_word; j++) {
        ints8 at = lanes + 8 * j;
        word_of[j] = at / per_word;
        shift_of[j] = at % per_word * bits;
    }
    for (long row = s->first; row < s->last; row++) {
        const unsigned *packed = m->packed + row * words;
        float *out = s->out + row * s->inputs;
        for (long k = 0; k < words; k += 8) {
            long g = row * groups + k / group_words;
            floats8 scale = m->scales[g] + (floats8){0}, bias = m->biases[g] + (floats8){0};
            ints8 eight;
            memcpy(&eight, packed + k, sizeof eight);
            for (int j = 0; j < per_word; j++) {
                ints8 q = (__builtin_shuffle(eight, word_of[j]) >> shift_of[j]) & mask;
                floats8 values = __builtin_convertvector(q, floats8) * scale;
                __asm__("" : "+x"(values)); /* no fused multiply-add: MLX rounds the product */
                values += bias;
                memcpy(out + k * per_word + 8 * j, &values, sizeof values);
            }
        }
    }
    return 0;
}

/* out (rows, inputs) = the float matrix `m` stands for, bit for bit as MLX's dequantize gives it,
   in fm_decode's layouts (group · bits a multiple of 256), where fm_quantized_products() says so. */
void fm_dequantize(const Quantized *m, long rows, long inputs, float *out, int threads) {
    threads = thread_count(threads, rows);
    Dequantizing shares[MAX_THREADS];
    for (int k = 0; k < threads; k++)
        shares[k] = (Dequantizing){.m = m, .inputs = inputs, .first = rows * k / threads,
                                   .last = rows * (k + 1) / threads, .out = out};
    run_shares(dequantize_rows, (char *)shares, sizeof(Dequantizing), threads);
}

/* y (rows, outputs) = x (rows, inputs) · weightᵀ, weight (outputs, inputs): float through
   sgemm, quantized (q->packed) through quantized_product, a row at a time. */
static void project(sgemm_function sgemm, long rows, long outputs, long inputs, const float *x,
                    const float *weight, const Quantized *q, float *y, float *scratch) {
    if (q->packed) {
        for (long row = 0; row < rows; row++)
            quantized_product(q, outputs, inputs, x + row * inputs, y + row * outputs, scratch);
        return;
    }
    sgemm(101, 111, 112, (int)rows, (int)outputs, (int)inputs, 1.0f, x, (int)inputs, weight,
          (int)inputs, 0.0f, y, (int)outputs);
}

static void normalize_rows(const float *in, const float *weight, long rows, long channels,
                           float eps, float *out) {
    memcpy(out, in, rows * channels * sizeof(float));
    for (long row = 0; row < rows; row++)
        normalize(out + row * channels, weight, channels, eps);
}

/* The width of in_proj's output: z and x (E each), the router logits (H·m), update and merge
   logits (H each). */
static long projected_size(const long *dims) {
    return 2 * dims[HEADS] * dims[WIDTH] + dims[HEADS] * dims[SLOTS] + 2 * dims[HEADS];
}

static void add(float *restrict to, const float *restrict values, long count) {
    for (long i = 0; i < count; i++)
        to[i] += values[i];
}

typedef struct {
    const long *dims;
    float temperature, eps;
    const unsigned char *mask;
    float *hidden, *normed, *projected, *window, *x_bar, *merged, *gated, *out, *product;
    char *routing; /* route's scratch: see share_scratch */
    int *written;  /* this layer's: see fm_decode */
    float *overwritten, *left;
} Step;

/* The mixer of one layer on row b of s->projected (z, x, router, update and merge logits):
   x̄ = SiLU(conv(x)), the mix, and RMSNorm(o ⊙ SiLU(z)) into row b of s->gated; its state and
   last conv inputs, updated in place. */
static void mix_row(const Step *s, const float *const *w, float *const *contents, long b) {
    long heads = s->dims[HEADS], slots = s->dims[SLOTS], width = s->dims[WIDTH];
    long inner = heads * width, taps = s->dims[TAPS];
    const float *row = s->projected + b * projected_size(s->dims), *gate = row, *router = row + 2 * inner;
    int masked = s->mask && !s->mask[b];
    float *x = s->window + (taps > 1 ? taps - 1 : 0) * inner, *x_bar = s->x_bar + b * inner;
    if (taps > 1)
        memcpy(s->window, contents[1] + b * (taps - 1) * inner, (taps - 1) * inner * sizeof(float));
    for (long c = 0; c < inner; c++)
        x[c] = masked && taps > 0 ? 0.0f : row[inner + c];
    if (taps > 0) {
        Rows conv = {.length = 1, .channels = inner, .taps = taps, .last = 1, .in = x,
                     .history = s->window, .weight = w[CONV_WEIGHT], .bias = w[CONV_BIAS],
                     .out = x_bar, .stride = inner};
        conv_rows(&conv);
    } else {
        for (long c = 0; c < inner; c++)
            x_bar[c] = silu(x[c]);
    }
    if (taps > 1) {
        if (s->left)
            memcpy(s->left + b * inner, s->window, inner * sizeof(float));
        memcpy(contents[1] + b * (taps - 1) * inner, s->window + inner,
               (taps - 1) * inner * sizeof(float));
    }
    long state_size = heads * slots * width, top_k = s->dims[TOP_K];
    float *state = contents[0] + b * state_size;
    Share mix = {.batch = 1, .length = 1, .heads = heads, .slots = slots, .width = width,
                 .top_k = top_k, .first = 0, .last = heads, .temperature = s->temperature,
                 .x = x_bar, .router = router, .update = router + heads * slots,
                 .merge = router + heads * slots + heads, .eta_bias = w[ETA_BIAS],
                 .mu_bias = w[MU_BIAS], .mask = s->mask ? s->mask + b : 0, .state = state,
                 .out = s->merged,
                 .written = s->written ? s->written + b * heads * top_k : 0,
                 .overwritten = s->written ? s->overwritten + b * heads * top_k * width : 0};
    share_scratch(&mix, s->routing);
    mix_share(&mix);
    Rows norm = {.channels = inner, .last = 1, .eps = s->eps, .in = s->merged,
                 .weight = w[MIXER_NORM], .gate = gate, .out = s->gated + b * inner,
                 .stride = inner};
    gate_norm_rows(&norm);
}

static void layer_step(const Step *s, long batch, const float *const *w, const Quantized *q,
                       float *const *contents, sgemm_function sgemm) {
    long hidden = s->dims[HIDDEN], inner = s->dims[HEADS] * s->dims[WIDTH];
    long size = projected_size(s->dims);
    normalize_rows(s->hidden, w[NORM], batch, hidden, s->eps, s->normed);
    project(sgemm, batch, size, hidden, s->normed, w[IN_PROJ], &q[IN_PROJ], s->projected,
            s->product);
    for (long b = 0; b < batch; b++)
        mix_row(s, w, contents, b);
    project(sgemm, batch, hidden, inner, s->gated, w[OUT_PROJ], &q[OUT_PROJ], s->out, s->product);
    add(s->hidden, s->out, batch * hidden);
    if (!w[MLP_NORM])
        return;
    long intermediate = s->dims[INTERMEDIATE];
    float *gates = s->projected, *ups = s->projected + batch * intermediate;
    normalize_rows(s->hidden, w[MLP_NORM], batch, hidden, s->eps, s->normed);
    project(sgemm, batch, intermediate, hidden, s->normed, w[GATE_PROJ], &q[GATE_PROJ], gates,
            s->product);
    project(sgemm, batch, intermediate, hidden, s->normed, w[UP_PROJ], &q[UP_PROJ], ups,
            s->product);
    for (long i = 0; i < batch * intermediate; i++)
        gates[i] = silu(gates[i]) * ups[i];
    project(sgemm, batch, hidden, intermediate, gates, w[DOWN_PROJ], &q[DOWN_PROJ], s->out,
            s->product);
    add(s->hidden, s->out, batch * hidden);
}

/* Returns 0; or, with nothing written, 1 when scratch memory could not be had, 2 for a token
   out of [0, vocab). */
int fm_decode(long batch, const long *dims, float temperature, float eps, const long *tokens,
              const unsigned char *mask, const float *const *weights, const Quantized *quantized,
              float *const *contents, int *written, float *overwritten, float *left,
              float *logits, sgemm_function sgemm) {
    for (long b = 0; b < batch; b++)
        if (tokens[b] < 0 || tokens[b] >= dims[VOCAB])
            return 2;
    long hidden = dims[HIDDEN], inner = dims[HEADS] * dims[WIDTH], taps = dims[TAPS];
    long size = projected_size(dims); /* s.projected also holds the MLP's gates and ups */
    if (size < 2 * dims[INTERMEDIATE])
        size = 2 * dims[INTERMEDIATE];
    long widest = hidden > inner ? hidden : inner;
    widest = widest > dims[INTERMEDIATE] ? widest : dims[INTERMEDIATE];
    long floats = batch * (2 * hidden + size + 3 * inner + hidden) + (taps > 1 ? taps : 1) * inner;
    float *scratch = malloc((floats + 2 * widest) * sizeof(float));
    char *routing = malloc(SCRATCH_BYTES(dims[TOP_K]));
    if (!scratch || !routing) {
        free(scratch);
        free(routing);
        return 1;
    }
    Step s = {.dims = dims, .temperature = temperature, .eps = eps, .mask = mask};
    s.hidden = scratch;
    s.normed = s.hidden + batch * hidden;
    s.projected = s.normed + batch * hidden;
    s.x_bar = s.projected + batch * size;
    s.merged = s.x_bar + batch * inner;
    s.gated = s.merged + batch * inner;
    s.out = s.gated + batch * inner;
    s.window = s.out + batch * hidden;
    s.product = s.window + (taps > 1 ? taps : 1) * inner;
    s.routing = routing;
    for (long b = 0; b < batch; b++) {
        if (quantized[EMBEDDINGS].packed)
            dequantized_row(&quantized[EMBEDDINGS], tokens[b], hidden, s.hidden + b * hidden);
        else
            memcpy(s.hidden + b * hidden, weights[EMBEDDINGS] + tokens[b] * hidden,
                   hidden * sizeof(float));
    }
    long written_size = batch * dims[HEADS] * dims[TOP_K];
    for (long layer = 0; layer < dims[LAYERS]; layer++) {
        long first = MODEL_WEIGHTS + layer * LAYER_WEIGHTS;
        if (written) {
            s.written = written + layer * written_size;
            s.overwritten = overwritten + layer * written_size * dims[WIDTH];
            s.left = left ? left + layer * batch * inner : 0;
        }
        layer_step(&s, batch, weights + first, quantized + first, contents + 2 * layer, sgemm);
    }
    normalize_rows(s.hidden, weights[FINAL_NORM], batch, hidden, eps, s.normed);
    project(sgemm, batch, dims[VOCAB], hidden, s.normed, weights[HEAD], &quantized[HEAD], logits,
            s.product);
    free(scratch);
    free(routing);
    return 0;
}
