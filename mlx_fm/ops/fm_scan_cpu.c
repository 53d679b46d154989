/* The FM scan as one loop over the tokens of each (row, head), for the CPU (mlx_fm/ops/native.py).

   Per token: every slot with a nonzero weight a decays by θ = η·a and takes θ·x̄, then the
   read is Σ a·slot over those slots, after the write (docs/SPEC.md). Slots with a = 0 are
   skipped, so they stay bit for bit as they were. The (row, head) pairs are independent and
   are shared among `threads` threads. Layouts, all float32 and contiguous: x (B, T, H, P),
   weights (B, T, H, m), eta (B, T, H), state (B, H, m, P) updated in place, reads (B, T, H, P). */

#include <pthread.h>

#define MAX_THREADS 64

typedef struct {
    long length, heads, slots, width, first, last;
    const float *x, *weights, *eta;
    float *state, *reads;
} Share;

static void scan_pair(const Share *s, long pair) {
    long row = pair / s->heads, head = pair % s->heads;
    float *state = s->state + pair * s->slots * s->width;
    for (long t = 0; t < s->length; t++) {
        long token = (row * s->length + t) * s->heads + head;
        const float *restrict x = s->x + token * s->width;
        const float *weights = s->weights + token * s->slots;
        float *restrict read = s->reads + token * s->width;
        for (long p = 0; p < s->width; p++)
            read[p] = 0.0f;
        for (long i = 0; i < s->slots; i++) {
            float weight = weights[i];
            if (weight == 0.0f)
                continue;
            float theta = s->eta[token] * weight, keep = 1.0f - theta;
            float *restrict slot = state + i * s->width;
            for (long p = 0; p < s->width; p++) {
                slot[p] = keep * slot[p] + theta * x[p];
                read[p] += weight * slot[p];
            }
        }
    }
}

static void *scan_share(void *share) {
    const Share *s = share;
    for (long pair = s->first; pair < s->last; pair++)
        scan_pair(s, pair);
    return 0;
}

/* A share whose thread cannot be started is scanned on this one. */
void fm_scan(long batch, long length, long heads, long slots, long width, const float *x,
            const float *weights, const float *eta, float *state, float *reads, int threads) {
    long pairs = batch * heads;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > pairs)
        threads = (int)pairs;
    if (threads < 1)
        threads = 1;
    Share shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 0; k < threads; k++) {
        shares[k] = (Share){length, heads, slots, width, pairs * k / threads,
                            pairs * (k + 1) / threads, x, weights, eta, state, reads};
        if (k > 0)
            started[k] = pthread_create(&ids[k], 0, scan_share, &shares[k]) == 0;
    }
    scan_share(&shares[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(ids[k], 0);
        else
            scan_share(&shares[k]);
    }
}
