/* Fused 2-core BTT product for float32 on CPU: forward and backward, batch-first, no layout copies.
 *
 * Built on first use by structlin/kernels/cpu_jit.py with the system C compiler (-O3 -march=native
 * -fopenmp), once per factor shape (FM1, FM0, FN0, FN1, FR) and with the number of 8-float vectors
 * each inner loop keeps in registers (NV_H, NV_K, NV_M0, NV_N1: 1, 2 or 4); called through ctypes.
 *
 * Shapes (as in kernels/btt.py): x (B, M1*M0); w0 (M1, H, M0) with H = N0*R, h = j0*R + rho;
 * w1 (N0, N1, K) with K = R*M1, k = rho*M1 + i1. Saved intermediate z (B, M1, H):
 *   z[b,i1,h]    = sum_i0 w0[i1,h,i0] x[b,i1,i0]
 *   y[b,j0,j1]   = bias[j0,j1] + sum_{rho,i1} w1[j0,j1,rho*M1+i1] z[b,i1,j0*R+rho]
 * Every loop vectorises over a contiguous last axis and broadcasts one scalar of the other
 * operand, over RB rows at a time, so the weights are read once per RB rows and every
 * activation is read and written once per pass.
 */
#include <omp.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define LD(p) (*(const v8u *)(p))
#define ST(p, v) (*(v8u *)(p) = (v))
#define BC(s) ((v8){0} + (s))
#ifndef RB
#define RB 2 /* rows per register block */
#endif

typedef struct {
  long B;
  int M1, M0, N0, N1, R;
} shape_t;

/* Built for one shape (-DFM1=... etc.): compile-time sizes let the compiler unroll the inner
 * loops, worth about 15% at d=1024. The struct still carries them, for the batch size and as a
 * check on the caller. */
#define SHAPE_CONSTANTS \
  enum { M1 = FM1, M0 = FM0, N0 = FN0, N1 = FN1, R = FR }; \
  if (s->M1 != M1 || s->M0 != M0 || s->N0 != N0 || s->N1 != N1 || s->R != R) return;

/* w0t: (M1, M0, H), w0 transposed per block; w1t: (N0, K, N1). bias may be NULL. */
void btt2_forward(const shape_t *s, const float *x, const float *w0t, const float *w1t,
                  const float *bias, float *z, float *y, int nthreads) {
  const long B = s->B;
  SHAPE_CONSTANTS
  const int H = N0 * R, K = R * M1;
  const long DIN = (long)M1 * M0, DOUT = (long)N0 * N1, DZ = (long)M1 * H;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (long b0 = 0; b0 < B; b0 += RB) {
    const int nr = (B - b0) < RB ? (int)(B - b0) : RB;
    long row[RB]; /* rows past the end repeat the first one; their results are not stored */
    for (int r = 0; r < RB; r++) row[r] = b0 + (r < nr ? r : 0);
    for (int i1 = 0; i1 < M1; i1++)
      for (int c = 0; c < H; c += 8 * NV_H) {
        v8 acc[RB][NV_H];
        for (int r = 0; r < RB; r++)
          for (int v = 0; v < NV_H; v++) acc[r][v] = (v8){0};
        const float *wp = w0t + (long)i1 * M0 * H + c;
        for (int i0 = 0; i0 < M0; i0++) {
          v8 w[NV_H];
          for (int v = 0; v < NV_H; v++) w[v] = LD(wp + (long)i0 * H + 8 * v);
          for (int r = 0; r < RB; r++) {
            const v8 a = BC(x[row[r] * DIN + i1 * M0 + i0]);
            for (int v = 0; v < NV_H; v++) acc[r][v] += a * w[v];
          }
        }
        for (int r = 0; r < nr; r++)
          for (int v = 0; v < NV_H; v++) ST(z + row[r] * DZ + i1 * H + c + 8 * v, acc[r][v]);
      }
    for (int j0 = 0; j0 < N0; j0++)
      for (int c = 0; c < N1; c += 8 * NV_N1) {
        v8 acc[RB][NV_N1];
        for (int r = 0; r < RB; r++)
          for (int v = 0; v < NV_N1; v++)
            acc[r][v] = bias ? (v8)LD(bias + j0 * N1 + c + 8 * v) : (v8){0};
        const float *wp = w1t + (long)j0 * K * N1 + c;
        for (int rho = 0; rho < R; rho++)
          for (int i1 = 0; i1 < M1; i1++) {
            v8 w[NV_N1];
            for (int v = 0; v < NV_N1; v++) w[v] = LD(wp + (long)(rho * M1 + i1) * N1 + 8 * v);
            for (int r = 0; r < RB; r++) {
              const v8 a = BC(z[row[r] * DZ + i1 * H + j0 * R + rho]);
              for (int v = 0; v < NV_N1; v++) acc[r][v] += a * w[v];
            }
          }
        for (int r = 0; r < nr; r++)
          for (int v = 0; v < NV_N1; v++) ST(y + row[r] * DOUT + j0 * N1 + c + 8 * v, acc[r][v]);
      }
  }
}

/* Floats of scratch btt2_backward needs per thread. */
long btt2_scratch_per_thread(void) {
  const long H = (long)FN0 * FR, K = (long)FR * FM1;
  return FM1 * H * FM0 + FN0 * K * FN1 + (long)FN0 * FN1 + RB * FN0 * K;
}

/* g (B, N0*N1). Writes dx (B, M1*M0) unless NULL, dw0 (M1, H, M0), dw1t (N0, K, N1) (w1's
 * gradient transposed per block) and db (N0*N1) unless NULL. scratch: nthreads *
 * btt2_scratch_per_thread floats (per-thread weight-gradient sums, reduced at the end). */
void btt2_backward(const shape_t *s, const float *x, const float *w0, const float *w1,
                   const float *z, const float *g, float *dx, float *dw0, float *dw1t, float *db,
                   float *scratch, int nthreads) {
  const long B = s->B;
  SHAPE_CONSTANTS
  const int H = N0 * R, K = R * M1;
  const long DIN = (long)M1 * M0, DOUT = (long)N0 * N1, DZ = (long)M1 * H;
  const long SW0 = (long)M1 * H * M0, SW1 = (long)N0 * K * N1;
  const long per = btt2_scratch_per_thread();
  memset(scratch, 0, sizeof(float) * per * nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    float *aw0 = scratch + per * omp_get_thread_num(), *aw1 = aw0 + SW0, *ab = aw1 + SW1;
    float *dzp = ab + DOUT; /* (RB, N0, K): the gradient of z for RB rows, in w1's k order */
#pragma omp for schedule(static)
    for (long b0 = 0; b0 < B; b0 += RB) {
      const int nr = (B - b0) < RB ? (int)(B - b0) : RB;
      long row[RB];
      for (int r = 0; r < RB; r++) row[r] = b0 + (r < nr ? r : 0);
      /* dzp[r,j0,k] = sum_j1 g[b,j0,j1] w1[j0,j1,k] */
      for (int j0 = 0; j0 < N0; j0++)
        for (int c = 0; c < K; c += 8 * NV_K) {
          v8 acc[RB][NV_K];
          for (int r = 0; r < RB; r++)
            for (int v = 0; v < NV_K; v++) acc[r][v] = (v8){0};
          for (int j1 = 0; j1 < N1; j1++) {
            v8 w[NV_K];
            for (int v = 0; v < NV_K; v++) w[v] = LD(w1 + ((long)j0 * N1 + j1) * K + c + 8 * v);
            for (int r = 0; r < RB; r++) {
              const v8 a = BC(g[row[r] * DOUT + j0 * N1 + j1]);
              for (int v = 0; v < NV_K; v++) acc[r][v] += a * w[v];
            }
          }
          for (int r = 0; r < RB; r++)
            for (int v = 0; v < NV_K; v++) ST(dzp + ((long)r * N0 + j0) * K + c + 8 * v, acc[r][v]);
        }
      /* with dz[b,i1,j0*R+rho] = dzp[b,j0,rho*M1+i1]:
       * dx[b,i1,:] = sum_h dz[b,i1,h] w0[i1,h,:];  dw0[i1,h,:] += dz[b,i1,h] x[b,i1,:] */
      for (int i1 = 0; i1 < M1; i1++)
        for (int c = 0; c < M0; c += 8 * NV_M0) {
          v8 xa[RB][NV_M0], acc[RB][NV_M0];
          for (int r = 0; r < RB; r++)
            for (int v = 0; v < NV_M0; v++) {
              /* padding rows contribute 0 to dw0 */
              xa[r][v] = r < nr ? (v8)LD(x + row[r] * DIN + i1 * M0 + c + 8 * v) : (v8){0};
              acc[r][v] = (v8){0};
            }
          for (int h = 0; h < H; h++) {
            const float *wp = w0 + ((long)i1 * H + h) * M0 + c;
            float *ap = aw0 + ((long)i1 * H + h) * M0 + c;
            v8 w[NV_M0], sum[NV_M0];
            for (int v = 0; v < NV_M0; v++) {
              w[v] = LD(wp + 8 * v);
              sum[v] = LD(ap + 8 * v);
            }
            for (int r = 0; r < RB; r++) {
              const v8 a = BC(dzp[((long)r * N0 + h / R) * K + (h % R) * M1 + i1]);
              for (int v = 0; v < NV_M0; v++) {
                acc[r][v] += a * w[v];
                sum[v] += a * xa[r][v];
              }
            }
            for (int v = 0; v < NV_M0; v++) ST(ap + 8 * v, sum[v]);
          }
          if (dx)
            for (int r = 0; r < nr; r++)
              for (int v = 0; v < NV_M0; v++) ST(dx + row[r] * DIN + i1 * M0 + c + 8 * v, acc[r][v]);
        }
      /* dw1t[j0,k,:] += z[b,i1,j0*R+rho] g[b,j0,:];  db += g[b] */
      for (int j0 = 0; j0 < N0; j0++)
        for (int c = 0; c < N1; c += 8 * NV_N1) {
          v8 ga[RB][NV_N1];
          for (int r = 0; r < RB; r++)
            for (int v = 0; v < NV_N1; v++)
              ga[r][v] = r < nr ? (v8)LD(g + row[r] * DOUT + j0 * N1 + c + 8 * v) : (v8){0};
          for (int k = 0; k < K; k++) {
            float *ap = aw1 + ((long)j0 * K + k) * N1 + c;
            v8 sum[NV_N1];
            for (int v = 0; v < NV_N1; v++) sum[v] = LD(ap + 8 * v);
            for (int r = 0; r < RB; r++) {
              const v8 a = BC(z[row[r] * DZ + (k % M1) * H + j0 * R + k / M1]);
              for (int v = 0; v < NV_N1; v++) sum[v] += a * ga[r][v];
            }
            for (int v = 0; v < NV_N1; v++) ST(ap + 8 * v, sum[v]);
          }
          if (db)
            for (int v = 0; v < NV_N1; v++) {
              v8 sum = LD(ab + j0 * N1 + c + 8 * v);
              for (int r = 0; r < RB; r++) sum += ga[r][v];
              ST(ab + j0 * N1 + c + 8 * v, sum);
            }
        }
    }
  }
  /* reduce the per-thread sums (fixed order: results do not depend on scheduling) */
  for (long i = 0; i < SW0 + SW1 + DOUT; i++) {
    float acc = 0.0f;
    for (int t = 0; t < nthreads; t++) acc += scratch[per * t + i];
    if (i < SW0)
      dw0[i] = acc;
    else if (i < SW0 + SW1)
      dw1t[i - SW0] = acc;
    else if (db)
      db[i - SW0 - SW1] = acc;
  }
}
