/* mlx_aim._blas_shim: the only BLAS and LAPACK names mlx_aim makes global on Linux x86-64.

MLX's libmlx.so imports the CBLAS and LAPACK functions listed below by name. mlx_aim/_blas.py opens an optimized
library (OpenBLAS, MKL) privately (RTLD_LOCAL), writes the address of each of its functions into this library's
table, and opens this library globally before mlx.core loads, so libmlx.so binds to these names. Each one is a
single indirect jump through its table entry: it forwards every argument register and the stack untouched, so it
needs no prototype (LAPACK's hidden Fortran string lengths included).

Why not open the optimized library globally: a global library also serves every library loaded after it. PyTorch's
CPU build links MKL statically and exports its functions, so a global OpenBLAS 0.3.33 took over its calls, and
cblas_dgemm_batch, which the two libraries declare differently, crashed float64 batched matmul in torch. Through
this table the rest of the process sees the 24 names MLX needs, whose signatures every BLAS shares.

The list is MLX 0.32's imports (`nm -D --undefined-only libmlx.so`). A name a later MLX adds and this list lacks
still resolves, from the reference BLAS its wheel bundles: slower, not wrong. */

#include <stddef.h>

#define MLX_AIM_BLAS_SYMBOLS(X)                                                                                      \
  X(0, cblas_sgemm) X(1, cblas_dgemm) X(2, cblas_cgemm) X(3, sgeev_) X(4, dgeev_) X(5, cgeev_) X(6, sgesdd_)         \
  X(7, dgesdd_) X(8, cgesdd_) X(9, ssyevd_) X(10, dsyevd_) X(11, cheevd_) X(12, sgeqrf_) X(13, dgeqrf_)              \
  X(14, sorgqr_) X(15, dorgqr_) X(16, sgetrf_) X(17, dgetrf_) X(18, sgetri_) X(19, dgetri_) X(20, spotrf_)           \
  X(21, dpotrf_) X(22, strtri_) X(23, dtrtri_)

#define MLX_AIM_COUNT(i, name) +1
enum { SYMBOL_COUNT = 0 MLX_AIM_BLAS_SYMBOLS(MLX_AIM_COUNT) };

/* Hidden, so the jumps below address it relative to the instruction pointer. */
__attribute__((visibility("hidden"))) void *mlx_aim_blas_table[SYMBOL_COUNT];

#define MLX_AIM_NAME(i, name) #name,
static const char *const symbol_names[SYMBOL_COUNT] = {MLX_AIM_BLAS_SYMBOLS(MLX_AIM_NAME)};

#if defined(__x86_64__) && defined(__ELF__)
#define MLX_AIM_TRAMPOLINE(i, name)                                                                                  \
  __asm__(".text\n"                                                                                                 \
          ".globl " #name "\n"                                                                                      \
          ".type " #name ", @function\n"                                                                            \
          ".p2align 4\n" #name ":\n"                                                                                \
          "  jmp *mlx_aim_blas_table+8*" #i "(%rip)\n"                                                              \
          ".size " #name ", .-" #name "\n");
MLX_AIM_BLAS_SYMBOLS(MLX_AIM_TRAMPOLINE)
#else
#error "mlx_aim's BLAS shim is built for Linux x86-64 only (setup.py builds it there)"
#endif

/* The interface _blas.py calls through ctypes. */
int mlx_aim_blas_count(void) { return SYMBOL_COUNT; }

const char *mlx_aim_blas_name(int i) { return i >= 0 && i < SYMBOL_COUNT ? symbol_names[i] : NULL; }

/* Fills the whole table at once, or nothing when an entry is NULL (returns its index, else -1). */
int mlx_aim_blas_bind(void *const *functions) {
  for (int i = 0; i < SYMBOL_COUNT; i++)
    if (functions[i] == NULL) return i;
  for (int i = 0; i < SYMBOL_COUNT; i++) mlx_aim_blas_table[i] = functions[i];
  return -1;
}

void *mlx_aim_blas_target(int i) { return i >= 0 && i < SYMBOL_COUNT ? mlx_aim_blas_table[i] : NULL; }
