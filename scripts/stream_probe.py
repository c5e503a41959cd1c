"""Probe: how fast can one kernel only *read* a decoder product's weights (33.6 MB gate/up, 16.8 MB down) on this GPU,
launched back to back in a CUDA graph over 8 copies (more than L2 holds), as the frame step launches its products?
That is the floor any hand-written 64-row product could reach, against the Triton tiles' time for the same bytes.

Two readers, each CTA streaming its own contiguous share of the weight (as a product's CTA owns its rows):
- `bulk`: one thread per CTA issues `cp.async.bulk` copies of CHUNK bytes into a ring of STAGES shared-memory slots
  (mbarrier completion), as a TMA-fed tile would;
- `ldg`: every thread loads 16 bytes at a time, UNROLL loads in flight, warps reading 512 contiguous bytes each.
Optionally with programmatic dependent launch (the next kernel's CTAs start as SMs free up and begin reading before
`griddepcontrol.wait`, as weights may).

Usage: python3 scripts/stream_probe.py"""

import ctypes
import sys

import torch

sys.path.insert(0, "scripts")
from gemm64_probe import addresses, launch, time_graph
from gemm64_source import HELPERS

from csmcli import kernels

SOURCE = HELPERS + r"""
extern "C" __global__ void bulk_read(const unsigned char* __restrict__ src, unsigned long long bytes,
                                     unsigned* __restrict__ sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) unsigned long long bars[STAGES];
  const unsigned long long share = bytes / gridDim.x;
  const unsigned char* base = src + share * blockIdx.x;
  const int chunks = (int)(share / CHUNK);
#if WAIT_FIRST && PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s)
      mbar_init(smem_addr(&bars[s]), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int c = 0; c < chunks + STAGES; ++c) {
      const int s = c % STAGES;
      if (c >= STAGES) {  // wait for the copy that used this slot
        mbar_wait(smem_addr(&bars[s]), ((c - STAGES) / STAGES) & 1);
      }
      if (c < chunks) {
        mbar_expect(smem_addr(&bars[s]), CHUNK);
        bulk(smem_addr(smem + s * CHUNK), base + (unsigned long long)c * CHUNK, CHUNK, smem_addr(&bars[s]));
      }
    }
#if PDL
    asm volatile("griddepcontrol.launch_dependents;");
#endif
  }
#if PDL && !WAIT_FIRST
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  __syncthreads();
  if (threadIdx.x == 0 && smem[7] == 0x5a && smem[CHUNK + 3] == 0xa5) sink[blockIdx.x] = 1;
}

extern "C" __global__ void ldg_read(const uint4* __restrict__ src, unsigned long long bytes,
                                    unsigned* __restrict__ sink) {
  const unsigned long long share = bytes / 16 / gridDim.x;  // uint4s per CTA
  const uint4* base = src + share * blockIdx.x;
  unsigned acc = 0;
#if WAIT_FIRST && PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (unsigned long long i = threadIdx.x; i < share; i += (unsigned long long)blockDim.x * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const unsigned long long j = i + (unsigned long long)u * blockDim.x;
      if (j < share)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(base + j));
      else
        v[u] = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
#if !WAIT_FIRST
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#endif
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;
}

// cp.async.bulk reader of the weight share (as bulk_read) beside XBYTES of x that the CL CTAs of a cluster share:
// each fetches 1/CL of it from L2 and multicasts it into every CTA of the cluster (CL 1: each CTA fetches it all).
extern "C" __global__ void __cluster_dims__(CL, 1, 1)
bulkx_read(const unsigned char* __restrict__ src, unsigned long long bytes, unsigned* __restrict__ sink,
           const unsigned char* __restrict__ xsrc) {
  extern __shared__ __align__(128) unsigned char smem[];  // [x: XBYTES][ring: STAGES x CHUNK]
  __shared__ __align__(8) unsigned long long bars[STAGES + 1], empty_bars[STAGES];
  const unsigned long long share = bytes / gridDim.x;
  const unsigned char* base = src + share * blockIdx.x;
  const unsigned cluster = blockIdx.x / CL, rank = blockIdx.x % CL;
#if HANDOFF  // warp 1 waits for each chunk and hands the slot back (a consumer's round trip, without its work)
  if (threadIdx.x == 32) {
    for (int s = 0; s < STAGES; ++s)
      mbar_init(smem_addr(&empty_bars[s]), 1);
  }
#endif
  const unsigned char* xbase = xsrc + (unsigned long long)XBYTES * (cluster % XSLICES);
  unsigned char* ring = smem + XBYTES;
  const int chunks = (int)(share / CHUNK);
  if (threadIdx.x == 0) {
    for (int s = 0; s <= STAGES; ++s)
      mbar_init(smem_addr(&bars[s]), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (threadIdx.x == 0) {
    for (int c = 0; c < STAGES && c < chunks; ++c) {
      mbar_expect(smem_addr(&bars[c]), CHUNK);
      bulk(smem_addr(ring + c * CHUNK), base + (unsigned long long)c * CHUNK, CHUNK, smem_addr(&bars[c]));
    }
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    mbar_expect(smem_addr(&bars[STAGES]), (unsigned)XBYTES);
    const unsigned part = (unsigned)(XBYTES / CL);
    for (unsigned off = rank * part; off < (rank + 1) * part; off += 16384) {
      const unsigned size = min(16384u, (rank + 1) * part - off);
#if CL > 1
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
                   "[%0], [%1], %2, [%3], %4;"
                   :: "r"(smem_addr(smem + off)), "l"(xbase + off), "r"(size), "r"(smem_addr(&bars[STAGES])),
                      "h"((unsigned short)((1 << CL) - 1)) : "memory");
#else
      bulk(smem_addr(smem + off), xbase + off, size, smem_addr(&bars[STAGES]));
#endif
    }
    for (int c = STAGES; c < chunks + STAGES; ++c) {
      const int s = c % STAGES;
      const unsigned parity = ((c - STAGES) / STAGES) & 1;
      mbar_wait(smem_addr(HANDOFF ? &empty_bars[s] : &bars[s]), parity);
      if (c < chunks) {
        mbar_expect(smem_addr(&bars[s]), CHUNK);
        bulk(smem_addr(ring + s * CHUNK), base + (unsigned long long)c * CHUNK, CHUNK, smem_addr(&bars[s]));
      }
    }
    mbar_wait(smem_addr(&bars[STAGES]), 0);
#if PDL
    asm volatile("griddepcontrol.launch_dependents;");
#endif
  }
#if HANDOFF
  if (threadIdx.x == 32) {
    for (int c = 0; c < chunks; ++c) {
      const int s = c % STAGES;
      mbar_wait(smem_addr(&bars[s]), (unsigned)((c / STAGES) & 1));
      mbar_arrive(smem_addr(&empty_bars[s]));
    }
  }
#endif
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (threadIdx.x == 0 && smem[7] == 0x5a && ring[3] == 0xa5) sink[blockIdx.x] = 1;
}

// The same, and every CTA also reads XBYTES of x from L2 (a slice of XSLICES, chosen by CTA index), as a 64-row
// product's CTA reads the rows of x beside its share of the weight.
extern "C" __global__ void ldgx_read(const uint4* __restrict__ src, unsigned long long bytes,
                                     unsigned* __restrict__ sink, const uint4* __restrict__ xsrc) {
  const unsigned long long share = bytes / 16 / gridDim.x;
  const unsigned long long xshare = XBYTES / 16;
  const uint4* base = src + share * blockIdx.x;
  const uint4* xbase = xsrc + xshare * (blockIdx.x % XSLICES);
  unsigned acc = 0;
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (unsigned long long i = threadIdx.x; i < share + xshare; i += (unsigned long long)blockDim.x * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const unsigned long long j = i + (unsigned long long)u * blockDim.x;
#if STAGGER  // each CTA starts its pass over x at another 4 KB: the CTAs do not all want the same lines at once
      const uint4* p = j < xshare ? xbase + (j + 256ull * blockIdx.x) % xshare : base + (j - xshare);
#else
      const uint4* p = j < xshare ? xbase + j : base + (j - xshare);
#endif
      if (j < share + xshare)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p));
      else
        v[u] = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;
}
"""


class Reader:
    def __init__(self, name, ctas, threads, pdl, wait_first=False, chunk=16384, stages=4, unroll=8, x_bytes=0,
                 x_slices=1, stagger=False, cl=1, handoff=False):
        defines = f"#define CHUNK {chunk}\n#define STAGES {stages}\n#define UNROLL {unroll}\n#define PDL {int(pdl)}\n" \
                  f"#define WAIT_FIRST {int(wait_first)}\n#define XBYTES {x_bytes}ull\n#define XSLICES {x_slices}\n" \
                  f"#define STAGGER {int(stagger)}\n#define CL {cl}\n#define HANDOFF {int(handoff)}\n"
        self.x = torch.zeros(max(16, x_bytes * x_slices) // 2, dtype=torch.bfloat16, device="cuda")
        self.kernel = torch.cuda._compile_kernel(defines + SOURCE, name)
        self.smem = chunk * stages if name == "bulk_read" else x_bytes + chunk * stages if name == "bulkx_read" else 0
        if self.smem:
            self.kernel.set_shared_memory_config(self.smem)
        self.ctas, self.threads, self.pdl = ctas, threads, pdl
        self.sink = torch.zeros(4096, dtype=torch.int32, device="cuda")
        self.label = (f"{name} ctas={ctas} threads={threads}" + (f" chunk={chunk // 1024}K x{stages}" if self.smem
                      else f" unroll={unroll}") + (" pdl" if pdl else "") + (" wait-first" if wait_first else "")
                      + (f" + x {x_bytes // 1024} KB a CTA ({x_slices} slices{', staggered' if stagger else ''})"
                         if x_bytes else "") + (f" cluster {cl}" if name == "bulkx_read" else "")
                      + (" handoff" if handoff else ""))
        self.name = name

    def __call__(self, w):
        values = [ctypes.c_void_p(w.data_ptr()), ctypes.c_uint64(w.numel() * w.element_size()),
                  ctypes.c_void_p(self.sink.data_ptr())]
        if self.name in ("ldgx_read", "bulkx_read"):
            values.append(ctypes.c_void_p(self.x.data_ptr()))
        launch(self.kernel, self.ctas, self.threads, self.smem, self.pdl, addresses(values))


SHAPES = {  # the 64-row frame's weight products: (rows of the weight, K, gated, times a frame)
    "decoder qkv": (1536, 1024, False, 128), "decoder o": (1024, 1024, False, 128),
    "decoder gate/up": (16384, 1024, True, 128), "decoder down": (1024, 8192, False, 128),
    "decoder head": (2051, 1024, False, 31),
    "backbone qkv": (3072, 2048, False, 16), "backbone o": (2048, 2048, False, 16),
    "backbone gate/up": (16384, 2048, True, 16), "backbone down": (2048, 8192, False, 16),
}


def floors():
    """Every product of the 64-row frame: the Triton tile's time against the fastest plain read of its bytes."""
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    total_read = total_triton = 0.0
    for label, (rows, k, gated, per_frame) in SHAPES.items():
        copies = max(8, int(400e6 // (rows * k * 2)))
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = rows * k * 2
        print(f"== {label}: {nbytes / 1e6:.1f} MB, {per_frame} a frame", flush=True)
        xs = [torch.randn(64, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]

        def triton_calls(xs=xs, weights=weights, copies=copies, gated=gated):
            for i in range(64):
                kernels.linear(xs[i % 8], weights[i % copies], gated=gated, batch=64)
            return 64

        tri = time_graph(triton_calls, "triton product (kernels.linear)", nbytes)
        best = None
        for ctas, threads in ((128, 512), (256, 256), (512, 256), (264, 512)):
            reader = Reader("ldg_read", ctas, threads, True, unroll=8)

            def calls(reader=reader, weights=weights, copies=copies):
                for i in range(64):
                    reader(weights[i % copies])
                return 64

            us = time_graph(calls, reader.label, nbytes)
            best = us if best is None else min(best, us)
        total_read += best * per_frame
        total_triton += tri * per_frame
        print(f"  floor {best:.2f} us, triton {tri:.2f} us; a frame: {best * per_frame / 1000:.3f} ms read, "
              f"{tri * per_frame / 1000:.3f} ms triton", flush=True)
    print(f"64-row frame, weight products only: plain reads {total_read / 1000:.3f} ms, "
          f"Triton tiles (isolated) {total_triton / 1000:.3f} ms", flush=True)


def with_x():
    """The decoder's two big products: their weight alone, then with the 128 KB of x every CTA of a 64-row tile
    reads beside it (gate/up: all of x; down: the CTA's K slice of 8): how much of the tiles' time is x's traffic,
    and how much of it a cluster's multicast (x fetched once a cluster) takes back."""
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for label, rows, k, slices in (("decoder gate/up", 16384, 1024, 1), ("decoder down", 1024, 8192, 8)):
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        nbytes = rows * k * 2
        print(f"== {label}: {nbytes / 1e6:.1f} MB", flush=True)
        readers = [Reader("ldg_read", 128, 512, True), Reader("ldgx_read", 128, 512, True, x_bytes=131072,
                                                               x_slices=slices)]
        readers += [Reader("bulkx_read", 128, threads, True, chunk=16384, stages=stages, x_bytes=131072,
                           x_slices=slices, handoff=handoff)
                    for threads, stages, handoff in ((32, 4, False), (64, 4, True), (64, 6, True), (160, 4, True))]
        for reader in readers:
            def calls(reader=reader, weights=weights):
                for i in range(64):
                    reader(weights[i % 8])
                return 64

            time_graph(calls, reader.label, nbytes)


def main():
    if "floors" in sys.argv[1:]:
        return floors()
    if "withx" in sys.argv[1:]:
        return with_x()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for label, rows, k, gated in (("decoder gate/up", 16384, 1024, True), ("decoder down", 1024, 8192, False)):
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        nbytes = rows * k * 2
        print(f"== {label}: {nbytes / 1e6:.1f} MB", flush=True)
        n = rows // 2 if gated else rows
        xs = [torch.randn(64, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        res = None if gated else torch.randn(64, n, device="cuda", dtype=torch.bfloat16)

        def triton_calls(xs=xs, weights=weights, res=res, gated=gated):
            for i in range(64):
                kernels.linear(xs[i % 8], weights[i % 8], residual=res, gated=gated, batch=64)
            return 64

        time_graph(triton_calls, "triton product (kernels.linear)", nbytes)
        readers = []
        for pdl in (False, True):
            for ctas in (128, 132, 256):
                readers.append(Reader("ldg_read", ctas, 256, pdl, unroll=8))
            readers.append(Reader("ldg_read", 128, 512, pdl, unroll=8))
            readers.append(Reader("ldg_read", 128, 256, pdl, unroll=16))
            for chunk, stages in ((16384, 4), (16384, 8), (32768, 4), (8192, 8), (4096, 16)):
                readers.append(Reader("bulk_read", 128, 32, pdl, chunk=chunk, stages=stages))
            readers.append(Reader("bulk_read", 256, 32, pdl, chunk=16384, stages=4))
        readers.append(Reader("ldg_read", 128, 256, True, wait_first=True, unroll=8))
        readers.append(Reader("bulk_read", 128, 32, True, wait_first=True, chunk=16384, stages=8))
        for reader in readers:
            def calls(reader=reader, weights=weights):
                for i in range(64):
                    reader(weights[i % 8])
                return 64
            try:
                time_graph(calls, reader.label, nbytes)
            except Exception as error:
                print(f"  {reader.label}: {type(error).__name__}: {str(error)[:200]}", flush=True)


if __name__ == "__main__":
    main()
