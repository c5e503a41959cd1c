"""CUDA C++ source of a 64-row bf16 product `out[64, N] = x[64, K] @ w[N, K].T`, for the probe
(scripts/gemm64_probe.py): weights streamed from HBM straight into registers (no shared-memory stage), the rows of x
in shared memory, K split across a thread-block cluster whose partial sums are added through distributed shared
memory (no second kernel). Compiled at run time by NVRTC (`torch.cuda._compile_kernel`), one build per shape.

Fragment order: within each 64-wide K chunk, lane t of a quad holds elements [8t, 8t+8) and [32+8t, 32+8t+8) of its
row (two 16-byte loads); mma step s takes pairs 2s and 2s+1 of those 16 elements. x's fragments use the same
permutation, so every physical k meets its own weight exactly once."""

HELPERS = r"""
typedef unsigned short bf16_t;
__device__ __forceinline__ uint4 ldg_w(const bf16_t* p) {
  uint4 v;
#if L2_256
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#endif
  return v;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void bulk(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"((unsigned long long)src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void mma16816(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float v) {
  bf16_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ float4 ld_cluster4(const float* p, unsigned rank) {
  unsigned remote;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote));
  return v;
}

"""

SOURCE = HELPERS + r"""
#define NWARPS (WN * WK)
#define BN (WN * 32)
#define KW (KC / WK)
#define CHUNKS (KW / 64)
#define XS (KC + 32)
#define RS (BN + 8)

extern "C" __global__ void __launch_bounds__(NWARPS * 32, 1)
#if SPLIT > 1
__cluster_dims__(SPLIT, 1, 1)
#endif
gemm64(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ res,
       bf16_t* __restrict__ out, int m, int stride_x, int stride_r, int stride_o) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16_t* xs = (bf16_t*)smem;  // [64, XS]: this CTA's K slice of x
  float* red = (float*)smem;   // [WK, 64, RS]: the warps' partial sums, after the products
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wk = warp / WN;
  const int cb = blockIdx.x / SPLIT, split = blockIdx.x % SPLIT;
#if GATED
  const int wrow = wn < WN / 2 ? cb * (BN / 2) + wn * 32 : N_HALF + cb * (BN / 2) + (wn - WN / 2) * 32;
#else
  const int wrow = cb * BN + wn * 32;
#endif
  const int k_warp = wk * KW;  // within the CTA's slice
  const bf16_t* wp = w + (size_t)(wrow + g) * K_FULL + split * KC + k_warp + 8 * t;

  uint4 wreg[DEPTH][4][2];  // weight fragments in flight: DEPTH chunks x 4 n8 tiles x 2 loads
#pragma unroll
  for (int c = 0; c < DEPTH; ++c)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wreg[c][j][0] = ldg_w(wp + (size_t)j * 8 * K_FULL + c * 64);
      wreg[c][j][1] = ldg_w(wp + (size_t)j * 8 * K_FULL + c * 64 + 32);
    }
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int i = tid; i < 64 * (KC / 8); i += NWARPS * 32) {
    const int r = i / (KC / 8), c8 = i % (KC / 8);
    const int rr = r < m ? r : 0;
    cp_async16(xs + r * XS + c8 * 8, x + (size_t)rr * stride_x + split * KC + c8 * 8, r < m ? 16 : 0);
  }
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_all;" ::: "memory");
  __syncthreads();

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int slot = c % DEPTH;
    unsigned wv[4][8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wv[j][0] = wreg[slot][j][0].x; wv[j][1] = wreg[slot][j][0].y;
      wv[j][2] = wreg[slot][j][0].z; wv[j][3] = wreg[slot][j][0].w;
      wv[j][4] = wreg[slot][j][1].x; wv[j][5] = wreg[slot][j][1].y;
      wv[j][6] = wreg[slot][j][1].z; wv[j][7] = wreg[slot][j][1].w;
    }
    if (c + DEPTH < CHUNKS) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wreg[slot][j][0] = ldg_w(wp + (size_t)j * 8 * K_FULL + (c + DEPTH) * 64);
        wreg[slot][j][1] = ldg_w(wp + (size_t)j * 8 * K_FULL + (c + DEPTH) * 64 + 32);
      }
    }
    const bf16_t* xrow = xs + g * XS + k_warp + c * 64 + 8 * t;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const uint4 lo0 = *(const uint4*)(xrow + (16 * mt) * XS);
      const uint4 hi0 = *(const uint4*)(xrow + (16 * mt) * XS + 32);
      const uint4 lo1 = *(const uint4*)(xrow + (16 * mt + 8) * XS);
      const uint4 hi1 = *(const uint4*)(xrow + (16 * mt + 8) * XS + 32);
      const unsigned ra[8] = {lo0.x, lo0.y, lo0.z, lo0.w, hi0.x, hi0.y, hi0.z, hi0.w};
      const unsigned rb[8] = {lo1.x, lo1.y, lo1.z, lo1.w, hi1.x, hi1.y, hi1.z, hi1.w};
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma16816(acc[mt][j], ra[2 * s], rb[2 * s], ra[2 * s + 1], rb[2 * s + 1], wv[j][2 * s], wv[j][2 * s + 1]);
    }
  }
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __syncthreads();  // every warp is done with xs: its space holds the partial sums now
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = 16 * mt + g, col = wn * 32 + 8 * j + 2 * t;
      *(float2*)&red[(wk * 64 + row) * RS + col] = make_float2(acc[mt][j][0], acc[mt][j][1]);
      *(float2*)&red[(wk * 64 + row + 8) * RS + col] = make_float2(acc[mt][j][2], acc[mt][j][3]);
    }
  __syncthreads();
  for (int i = tid; i < 64 * BN / 4; i += NWARPS * 32) {  // the warps' K parts, added in order
    const int r = i / (BN / 4), c = 4 * (i % (BN / 4));
    float4 s = *(const float4*)&red[r * RS + c];
#pragma unroll
    for (int q = 1; q < WK; ++q) {
      const float4 p = *(const float4*)&red[(q * 64 + r) * RS + c];
      s.x += p.x; s.y += p.y; s.z += p.z; s.w += p.w;
    }
    *(float4*)&red[r * RS + c] = s;
  }
#if SPLIT > 1
  cluster_sync();  // every CTA of the cluster has its sums in place
  const int rows = 64 / SPLIT;
  for (int i = tid; i < rows * BN / 4; i += NWARPS * 32) {
    const int r = split * rows + i / (BN / 4), c = 4 * (i % (BN / 4));
    float4 parts[SPLIT];
#pragma unroll
    for (int q = 0; q < SPLIT; ++q) parts[q] = ld_cluster4(&red[r * RS + c], q);  // all in flight, then added
    float4 s = parts[0];
#pragma unroll
    for (int q = 1; q < SPLIT; ++q) { s.x += parts[q].x; s.y += parts[q].y; s.z += parts[q].z; s.w += parts[q].w; }
    if (r < m) {
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float o = round_bf16(v[e]);
#if HAS_RES
        o += bf16_to_f32(res[(size_t)r * stride_r + cb * BN + c + e]);
#endif
        out[(size_t)r * stride_o + cb * BN + c + e] = f32_to_bf16(o);
      }
    }
  }
  cluster_sync();  // keep this CTA's shared memory until the others have read it
#else
  __syncthreads();
#if GATED
  for (int i = tid; i < 64 * (BN / 2); i += NWARPS * 32) {
    const int r = i / (BN / 2), c = i % (BN / 2);
    if (r < m) {
      const float gate = round_bf16(red[r * RS + c]);
      const float up = round_bf16(red[r * RS + BN / 2 + c]);
      const float act = round_bf16(gate / (1.f + expf(-gate)));
      out[(size_t)r * stride_o + cb * (BN / 2) + c] = f32_to_bf16(act * up);
    }
  }
#else
  for (int i = tid; i < 64 * BN; i += NWARPS * 32) {
    const int r = i / BN, c = i % BN;
    if (r < m) {
      float v = round_bf16(red[r * RS + c]);
#if HAS_RES
      v += bf16_to_f32(res[(size_t)r * stride_r + cb * BN + c]);
#endif
      out[(size_t)r * stride_o + cb * BN + c] = f32_to_bf16(v);
    }
  }
#endif
#endif
}
"""


def defines(*, n: int, k: int, wn: int, wk: int, split: int, gated: bool, residual: bool, depth: int,
            pdl: bool = False, l2_256: bool = False) -> str:
    """The #defines of one build: `n` output columns (gated: the weight has 2n rows), `k` the full K."""
    kc = k // split
    assert k % split == 0 and kc % (wk * 64) == 0 and 64 % split == 0
    assert (n * (2 if gated else 1)) % (wn * 32) == 0 and not (gated and split > 1) and not (gated and wn % 2)
    assert 1 <= depth <= kc // wk // 64
    values = dict(WN=wn, WK=wk, SPLIT=split, KC=kc, K_FULL=k, GATED=int(gated), HAS_RES=int(residual),
                  DEPTH=depth, N_HALF=n if gated else 0, PDL=int(pdl), L2_256=int(l2_256))
    return "".join(f"#define {key} {value}\n" for key, value in values.items())


def smem_bytes(*, k: int, wn: int, wk: int, split: int) -> int:
    kc = k // split
    return max(64 * (kc + 32) * 2, wk * 64 * (wn * 32 + 8) * 4)


def grid(*, n: int, wn: int, split: int, gated: bool) -> int:
    rows = n * (2 if gated else 1)
    return rows // (wn * 32) * split


SMALL_SOURCE = HELPERS + r"""
#define KW (KC / WK)
#define CHUNKS (KW / 64)
#define PS 36

__device__ __forceinline__ uint4 ldg_x(const bf16_t* p) {  // written by the kernel before: L2, not L1
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// out[m, N] = x[m, K] @ w[N, K].T (+ res): a CTA owns 32 weight rows and a K slice of KC; its WK warps split the
// slice; the cluster's SPLIT CTAs split K. Weights and x go straight from memory into mma fragments (no shared
// stage); the SPLIT x WK partial tiles are added in a fixed order through distributed shared memory.
extern "C" __global__ void __launch_bounds__(WK * 32)
#if SPLIT > 1
__cluster_dims__(SPLIT, 1, 1)
#endif
gemm64_small(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, const bf16_t* __restrict__ res,
             bf16_t* __restrict__ out, int m, int stride_x, int stride_r, int stride_o) {
  __shared__ __align__(16) float part[WK][64][PS];
  const int tid = threadIdx.x, wk = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int cb = blockIdx.x / SPLIT, split = blockIdx.x % SPLIT;
  const int k0 = split * KC + wk * KW + 8 * t;
  const bf16_t* wp = w + (size_t)(cb * 32 + g) * K_FULL + k0;
  uint4 wr[CHUNKS][4][2];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wr[c][j][0] = ldg_w(wp + (size_t)j * 8 * K_FULL + c * 64);
      wr[c][j][1] = ldg_w(wp + (size_t)j * 8 * K_FULL + c * 64 + 32);
    }
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  uint4 xr[CHUNKS][4][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    const int r0 = min(16 * mt + g, m - 1), r1 = min(16 * mt + g + 8, m - 1);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      xr[c][mt][0] = ldg_x(x + (size_t)r0 * stride_x + k0 + c * 64);
      xr[c][mt][1] = ldg_x(x + (size_t)r0 * stride_x + k0 + c * 64 + 32);
      xr[c][mt][2] = ldg_x(x + (size_t)r1 * stride_x + k0 + c * 64);
      xr[c][mt][3] = ldg_x(x + (size_t)r1 * stride_x + k0 + c * 64 + 32);
    }
  }
  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const unsigned ra[8] = {xr[c][mt][0].x, xr[c][mt][0].y, xr[c][mt][0].z, xr[c][mt][0].w,
                              xr[c][mt][1].x, xr[c][mt][1].y, xr[c][mt][1].z, xr[c][mt][1].w};
      const unsigned rb[8] = {xr[c][mt][2].x, xr[c][mt][2].y, xr[c][mt][2].z, xr[c][mt][2].w,
                              xr[c][mt][3].x, xr[c][mt][3].y, xr[c][mt][3].z, xr[c][mt][3].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned wv[8] = {wr[c][j][0].x, wr[c][j][0].y, wr[c][j][0].z, wr[c][j][0].w,
                                wr[c][j][1].x, wr[c][j][1].y, wr[c][j][1].z, wr[c][j][1].w};
#pragma unroll
        for (int s = 0; s < 4; ++s)
          mma16816(acc[mt][j], ra[2 * s], rb[2 * s], ra[2 * s + 1], rb[2 * s + 1], wv[2 * s], wv[2 * s + 1]);
      }
    }
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = 16 * mt + g, col = 8 * j + 2 * t;
      *(float2*)&part[wk][row][col] = make_float2(acc[mt][j][0], acc[mt][j][1]);
      *(float2*)&part[wk][row + 8][col] = make_float2(acc[mt][j][2], acc[mt][j][3]);
    }
  cluster_sync();  // every warp of every CTA of the cluster has its partial tile in place
  const int rows = 64 / SPLIT;
  for (int i = tid; i < rows * 8; i += WK * 32) {
    const int r = split * rows + i / 8, c = 4 * (i % 8);
    float4 p[SPLIT * WK];
#pragma unroll
    for (int q = 0; q < SPLIT; ++q)
#pragma unroll
      for (int v = 0; v < WK; ++v) p[q * WK + v] = ld_cluster4(&part[v][r][c], q);
    float4 s = p[0];
#pragma unroll
    for (int q = 1; q < SPLIT * WK; ++q) { s.x += p[q].x; s.y += p[q].y; s.z += p[q].z; s.w += p[q].w; }
    if (r < m) {
      const float sums[4] = {s.x, s.y, s.z, s.w};
      bf16_t o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = bf16_to_f32(f32_to_bf16(sums[e]));
#if HAS_RES
        v += bf16_to_f32(res[(size_t)r * stride_r + cb * 32 + c + e]);
#endif
        o[e] = f32_to_bf16(v);
      }
      uint2 packed = make_uint2((unsigned)o[0] | ((unsigned)o[1] << 16), (unsigned)o[2] | ((unsigned)o[3] << 16));
      *(uint2*)&out[(size_t)r * stride_o + cb * 32 + c] = packed;
    }
  }
  cluster_sync();  // this CTA's partial tiles stay until the cluster has read them
}
"""


def small_defines(*, n: int, k: int, wk: int, split: int, residual: bool, pdl: bool = True) -> str:
    kc = k // split
    assert k % split == 0 and kc % (wk * 64) == 0 and 64 % split == 0 and n % 32 == 0 and wk <= 4  # static smem
    values = dict(WK=wk, SPLIT=split, KC=kc, K_FULL=k, HAS_RES=int(residual), PDL=int(pdl))
    return "".join(f"#define {key} {value}\n" for key, value in values.items())
