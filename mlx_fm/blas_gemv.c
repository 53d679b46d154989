/* A cblas_sgemm that hands a product with one row or one column to cblas_sgemv.
 *
 * MLX's CPU back-end multiplies a vector by a matrix with cblas_sgemm. OpenBLAS's sgemm
 * first copies (packs) the whole matrix, so a decode step's matrix-vector products cost
 * 3-5x what its sgemv does. mlx_fm/blas.py builds this file, loads it ahead of OpenBLAS
 * so that MLX binds this cblas_sgemm, and passes OpenBLAS's sgemm and sgemv to
 * forward_to() before MLX is loaded. Every other product goes to OpenBLAS's sgemm. */

typedef void (*sgemm_function)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
typedef void (*sgemv_function)(int, int, int, int, float, const float *, int, const float *,
                               int, float, float *, int);

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111, TRANS = 112 };

static sgemm_function real_sgemm;
static sgemv_function real_sgemv;

void forward_to(sgemm_function sgemm, sgemv_function sgemv) {
  real_sgemm = sgemm;
  real_sgemv = sgemv;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  if (k <= 0 || (m != 1 && n != 1) || (order != ROW_MAJOR && order != COL_MAJOR)) {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (order == COL_MAJOR) { /* C' = op(B)' op(A)', a row-major product */
    int swap = trans_a;
    trans_a = trans_b;
    trans_b = swap;
    swap = m;
    m = n;
    n = swap;
    swap = lda;
    lda = ldb;
    ldb = swap;
    const float *other = a;
    a = b;
    b = other;
  }
  int a_plain = trans_a == NO_TRANS, b_plain = trans_b == NO_TRANS;
  int length = m == 1 ? n : m, stride = m == 1 ? 1 : ldc;
  if (beta == 0.0f) /* sgemm ignores C when beta is 0; sgemv would scale NaNs in it */
    for (int i = 0; i < length; i++) c[(long)i * stride] = 0.0f;
  if (m == 1) /* C's row = op(B)' times op(A)'s row */
    real_sgemv(ROW_MAJOR, b_plain ? TRANS : NO_TRANS, b_plain ? k : n, b_plain ? n : k, alpha, b,
               ldb, a, a_plain ? 1 : lda, beta, c, 1);
  else /* C's column = op(A) times op(B)'s column */
    real_sgemv(ROW_MAJOR, a_plain ? NO_TRANS : TRANS, a_plain ? m : k, a_plain ? k : m, alpha, a,
               lda, b, b_plain ? ldb : 1, beta, c, ldc);
}
