"""CUDA C++ source of a Hopper-native 64-row product `out[64, N] = x[64, K] @ w[N, K].T` for the probe
(scripts/gemm64_probe.py `wgmma`): TMA (host-made tensor maps, 128-byte swizzle) copies weight and x tiles into a
ring of shared-memory stages, a producer warp keeps STAGES tiles in flight, and one consumer warpgroup multiplies
them with `wgmma.mma_async` (m64nBNk16; x is the 64-row A operand, the weight rows the B operand, both K-major).
Gated: the tile's first BN/2 weight rows are gate rows, the next BN/2 the matching up rows, and the epilogue writes
silu(gate) * up from registers. The stream probe (stream_probe.py withx) found bulk copies carry the weight and
the 64 rows of x at ~9.4 us for the decoder's gate/up, against 10.9 for the Triton tile and 12.2 for 16-byte loads."""

from gemm64_source import HELPERS  # bf16 conversions, shared-memory addresses (scripts/ is on the path)

STAGE_BYTES_X = 64 * 128  # a 64-row x tile of 64 K-elements, bf16


def _wgmma_asm(bn: int) -> str:
    regs = bn // 2  # f32 accumulators a thread holds for m64nBN
    outs = ",".join(f"%{i}" for i in range(regs))
    return (f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n'
            f'wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.bf16.bf16 {{{outs}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;'
            f'\\n}}\\n" : ' + ", ".join(f'"+f"(d[{i}])' for i in range(regs))
            + ' : "l"(desc_a), "l"(desc_b), "r"(scale_d));')


def source(*, bn: int, k: int, stages: int, gated: bool, residual: bool, pdl: bool, n_half: int = 0,
           tiled: bool = False, x_mode: int = 0, overlap: bool = False, no_mma: bool = False,
           lane_wait: bool = False) -> str:
    """`n_half`: gated, the first up row (the number of gate rows). `tiled`: the weight comes as `tile_weight` lays
    it out, each stage's tile one contiguous block copied by one `cp.async.bulk` (the TMA map's boxes read 128
    bytes a row). `x_mode`: 0, x's tile of each stage through its TMA map; 1, from x laid out as `tile_weight`
    lays out a 64-row weight, one bulk copy a stage; 2, the same, all of x copied once into shared memory at the
    start (K = 1024: 128 KB) and only the weight tiles staged; 3, as 2 with a barrier per x tile, so the first
    products need only the first tiles. `overlap`: a stage's products run while the next stage is awaited (one
    wgmma group in flight), the stage before is released then. `no_mma`: a timing experiment, stages released
    as they arrive, no products (wrong results). `lane_wait`: one lane of each consumer warp polls a stage's
    barrier, the others wait at `__syncwarp` (128 threads polling shared memory may slow the copies into it)."""
    assert bn in (64, 128, 256) and k % 64 == 0 and not (gated and residual) and (x_mode < 2 or k <= 1024)
    defines = dict(BN=bn, K_FULL=k, KT=k // 64, STAGES=stages, GATED=int(gated), HAS_RES=int(residual),
                   PDL=int(pdl), REGS=bn // 2, N_HALF=n_half, TILED=int(tiled), X_MODE=x_mode,
                   OVERLAP=int(overlap), NO_MMA=int(no_mma), LANE_WAIT=int(lane_wait))
    head = "".join(f"#define {key} {value}\n" for key, value in defines.items())
    return head + HELPERS + _SOURCE.replace("WGMMA_ASM", _wgmma_asm(bn))


def tile_weight(w, bn: int, gated: bool):
    """`w [rows, K]` as `[rows / bn, K / 64, bn, 64]` blocks, each the shared-memory image of one stage's tile: 128
    bytes a row, its 16-byte chunks in the 128-byte swizzle's order (chunk c of row r at c ^ (r % 8)); gated, each
    block's first bn/2 rows are gate rows and the next bn/2 the matching up rows."""
    import torch

    rows, k = w.shape
    if gated:
        half = rows // 2
        blocks = half // (bn // 2)
        w = torch.cat([w[:half].reshape(blocks, bn // 2, k), w[half:].reshape(blocks, bn // 2, k)], dim=1)
    else:
        w = w.reshape(rows // bn, bn, k)
    blocks = w.shape[0]
    chunks = w.reshape(blocks, bn, k // 64, 8, 8).permute(0, 2, 1, 3, 4)  # [blocks, kb, r, chunk, 8]
    source = torch.arange(8, device=w.device)[None, :] ^ (torch.arange(bn, device=w.device)[:, None] % 8)
    index = source[None, None, :, :, None].expand(blocks, k // 64, bn, 8, 8)
    return torch.gather(chunks, 3, index).reshape(blocks, k // 64, bn, 64).contiguous()


def smem_bytes(*, bn: int, stages: int, k: int = 0, x_mode: int = 0) -> int:
    if x_mode >= 2:
        return 1024 + k // 64 * STAGE_BYTES_X + stages * bn * 128
    return 1024 + stages * (STAGE_BYTES_X + bn * 128)


_SOURCE = r"""
typedef unsigned long long u64;
struct __align__(64) TensorMap { u64 data[16]; };
#define W_BYTES (BN * 128)
#define X_BYTES (64 * 128)
#define STAGE_BYTES (X_BYTES + W_BYTES)
#if X_MODE >= 2
#define X_TILE(i, s) (base + (i) * X_BYTES)
#define W_TILE(s) (base + KT * X_BYTES + (s) * W_BYTES)
#define STAGE_TX W_BYTES
#else
#define X_TILE(i, s) (base + (s) * STAGE_BYTES)
#define W_TILE(s) (base + (s) * STAGE_BYTES + X_BYTES)
#define STAGE_TX STAGE_BYTES
#endif

__device__ __forceinline__ void consumer_wait(unsigned bar, unsigned parity) {
#if LANE_WAIT
  if ((threadIdx.x & 31) == 0) mbar_wait(bar, parity);
  __syncwarp();
#else
  mbar_wait(bar, parity);
#endif
}

__device__ __forceinline__ void tma_2d(unsigned dst, const TensorMap* map, int c0, int c1, unsigned bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%2, %3}], [%4];"
               :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}

__device__ __forceinline__ u64 desc(unsigned addr) {  // K-major, 128-byte swizzle, 8-row groups 1024 bytes apart
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma(float* d, u64 desc_a, u64 desc_b, unsigned scale_d) {
  WGMMA_ASM
}

// Block: 4 consumer warps (one warpgroup) + 1 producer warp. Grid: one CTA per BN weight rows.
extern "C" __global__ void __launch_bounds__(160, 1)
wgmma64(const __grid_constant__ TensorMap w_map, const __grid_constant__ TensorMap x_map,
        const bf16_t* __restrict__ res, bf16_t* __restrict__ out, int m, int stride_r, int stride_o,
        const unsigned char* __restrict__ w_tiled, const unsigned char* __restrict__ x_tiled) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES], x_full, x_tile[KT];
  const unsigned base = (smem_addr(smem_raw) + 1023) & ~1023u;  // stage s: x tile, then weight tile
  const int tid = threadIdx.x, warp = tid >> 5;
  const int cb = blockIdx.x;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), 4);  // one arrival per consumer warp
    }
    mbar_init(smem_addr(&x_full), 1);
    for (int j = 0; j < KT; ++j) mbar_init(smem_addr(&x_tile[j]), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 4) {  // producer
    if ((tid & 31) == 0) {
      auto load_weights = [&](unsigned dst, int i, unsigned bar) {  // k-block i of this CTA's rows
#if TILED
        bulk(dst, w_tiled + ((size_t)cb * KT + i) * W_BYTES, W_BYTES, bar);
#elif GATED
        tma_2d(dst, &w_map, i * 64, cb * (BN / 2), bar);
        tma_2d(dst + W_BYTES / 2, &w_map, i * 64, N_HALF + cb * (BN / 2), bar);
#else
        tma_2d(dst, &w_map, i * 64, cb * BN, bar);
#endif
      };
      auto load_x = [&](unsigned dst, int i, unsigned bar) {  // k-block i of x's 64 rows
#if X_MODE == 0
        tma_2d(dst, &x_map, i * 64, 0, bar);
#else
        bulk(dst, x_tiled + (size_t)i * X_BYTES, X_BYTES, bar);
#endif
      };
      // weights first (they do not depend on the kernel before), x once that kernel is done
      for (int i = 0; i < STAGES && i < KT; ++i) {
        mbar_expect(smem_addr(&full[i]), STAGE_TX);
        load_weights(W_TILE(i), i, smem_addr(&full[i]));
      }
#if PDL
      asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if X_MODE == 2
      mbar_expect(smem_addr(&x_full), KT * X_BYTES);
      for (int j = 0; j < KT; j += 2)
        bulk(X_TILE(j, 0), x_tiled + (size_t)j * X_BYTES, (KT - j > 1 ? 2 : 1) * X_BYTES, smem_addr(&x_full));
#elif X_MODE == 3
      for (int j = 0; j < KT; ++j) {
        mbar_expect(smem_addr(&x_tile[j]), X_BYTES);
        bulk(X_TILE(j, 0), x_tiled + (size_t)j * X_BYTES, X_BYTES, smem_addr(&x_tile[j]));
      }
#else
      for (int i = 0; i < STAGES && i < KT; ++i) load_x(X_TILE(i, i), i, smem_addr(&full[i]));
#endif
      for (int i = STAGES; i < KT; ++i) {
        const int s = i % STAGES;
        mbar_wait(smem_addr(&empty[s]), ((i / STAGES) - 1) & 1);
        const unsigned bar = smem_addr(&full[s]);
        mbar_expect(bar, STAGE_TX);
        load_weights(W_TILE(s), i, bar);
#if X_MODE < 2
        load_x(X_TILE(i, s), i, bar);
#endif
      }
    }
    return;
  }
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  float d[REGS];
#pragma unroll
  for (int r = 0; r < REGS; ++r) d[r] = 0.f;
#if X_MODE == 2
  consumer_wait(smem_addr(&x_full), 0);
#endif
  for (int i = 0; i < KT; ++i) {
    const int s = i % STAGES;
#if X_MODE == 3
    consumer_wait(smem_addr(&x_tile[i]), 0);
#endif
    consumer_wait(smem_addr(&full[s]), (i / STAGES) & 1);
#if NO_MMA
    if ((tid & 31) == 0) mbar_arrive(smem_addr(&empty[s]));
    continue;
#endif
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma(d, desc(X_TILE(i, s) + kk * 32), desc(W_TILE(s) + kk * 32), 1);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#if OVERLAP  // one group in flight: the previous stage is read once at most this one is pending
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    if (i > 0 && (tid & 31) == 0) mbar_arrive(smem_addr(&empty[(i - 1) % STAGES]));
#else
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if ((tid & 31) == 0) mbar_arrive(smem_addr(&empty[s]));  // this warp's part of the stage is read
#endif
  }
#if OVERLAP
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  // d[4j + e]: row 16 * warp + g (+8 for e >= 2), column 8j + 2t (+1 for odd e)
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = 16 * warp + g + 8 * half;
    if (row >= m) continue;
#if GATED
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      bf16_t o[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gate = round_bf16(d[4 * j + 2 * half + e]);
        const float up = round_bf16(d[4 * (j + BN / 16) + 2 * half + e]);
        o[e] = f32_to_bf16(round_bf16(gate / (1.f + expf(-gate))) * up);
      }
      *(unsigned*)&out[(size_t)row * stride_o + cb * (BN / 2) + 8 * j + 2 * t] = o[0] | ((unsigned)o[1] << 16);
    }
#else
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      bf16_t o[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = round_bf16(d[4 * j + 2 * half + e]);
#if HAS_RES
        v += bf16_to_f32(res[(size_t)row * stride_r + cb * BN + 8 * j + 2 * t + e]);
#endif
        o[e] = f32_to_bf16(v);
      }
      *(unsigned*)&out[(size_t)row * stride_o + cb * BN + 8 * j + 2 * t] = o[0] | ((unsigned)o[1] << 16);
    }
#endif
  }
}
"""
