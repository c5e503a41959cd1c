#!/usr/bin/env bash
# How the numbers in docs/BENCHMARKS.md are made on a lent GPU box that has torch + transformers but no registry:
# wheels for the missing packages travel in .whl/ (see docs/BENCHMARKS.md), csmcli runs from the checkout.
# Usage: scripts/device_run.sh OUTDIR STEP...   (steps: see the case below)
set -euo pipefail
out=${1:?usage: device_run.sh OUTDIR STEP...}; shift
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
csm() { python3 -m csmcli "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    tests) python3 -m pytest -q -o addopts=-ra tests/test_engine_cuda.py tests/test_codec_cuda.py tests/test_kernels.py 2>&1 \
             | tee "$out/tests.txt" || true ;;
    tune) python3 scripts/tune_kernels.py 2>&1 | tee "$out/tune.txt" ;;
    tunegemv) python3 scripts/tune_kernels.py gemv 2>&1 | tee "$out/tunegemv.txt" ;;
    tunebatched) python3 scripts/tune_kernels.py batched 2>&1 | tee "$out/tunebatched.txt" ;;
    tunesample) python3 scripts/tune_kernels.py sample 2>&1 | tee "$out/tunesample.txt" ;;
    tunewide) python3 scripts/tune_kernels.py wide 2>&1 | tee "$out/tunewide.txt" ;;
    tunefp8) python3 scripts/tune_kernels.py fp8 2>&1 | tee "$out/tunefp8.txt" ;;
    tunefp8batched) python3 scripts/tune_kernels.py fp8batched 2>&1 | tee "$out/tunefp8batched.txt" ;;
    tuneprefill) python3 scripts/tune_kernels.py prefill 2>&1 | tee "$out/tuneprefill.txt" ;;
    tunefp8prefill) python3 scripts/tune_kernels.py fp8prefill 2>&1 | tee "$out/tunefp8prefill.txt" ;;
    buckets) python3 scripts/bucket_timing.py 2>&1 | tee "$out/buckets.txt" ;;
    nopdl) CSMCLI_NO_PDL=1 csm bench --random-weights --batch 1,4,16,64 --chunk-frames 8 --frames 60 --reps 3 \
             -o "$out/nopdl.json" 2>&1 | tee "$out/nopdl.txt" ;;
    torchops) CSMCLI_NO_FUSED_KERNELS=1 csm bench --random-weights --batch 1 --chunk-frames 8 --frames 100 --reps 3 \
                -o "$out/torchops.json" 2>&1 | tee "$out/torchops.txt" ;;
    bench1) csm bench --random-weights --batch 1 --chunk-frames 2,8 --frames 100 --reps 3 \
              -o "$out/bench1.json" 2>&1 | tee "$out/bench1.txt" ;;
    bench1fp8) csm bench --random-weights --fp8 --batch 1 --chunk-frames 2,8 --frames 100 --reps 3 \
                 -o "$out/bench1fp8.json" 2>&1 | tee "$out/bench1fp8.txt" ;;
    sweepfp8) csm bench --random-weights --fp8 --batch 1,4,16,64 --chunk-frames 8 --frames 60 --reps 3 \
                -o "$out/sweepfp8.json" 2>&1 | tee "$out/sweepfp8.txt" ;;
    sweep) csm bench --random-weights --batch 1,4,16,64 --chunk-frames 8 --frames 60 --reps 3 \
             -o "$out/sweep.json" 2>&1 | tee "$out/sweep.txt" ;;
    wide) csm bench --random-weights --batch 64,128,256 --chunk-frames 8 --frames 60 --reps 3 \
            -o "$out/wide.json" 2>&1 | tee "$out/wide.txt" ;;
    b512) csm bench --random-weights --batch 512 --chunk-frames 8 --frames 60 --reps 2 \
            -o "$out/b512.json" 2>&1 | tee "$out/b512.txt" ;;
    long256) csm bench --random-weights --batch 256 --frames 1000 --reps 2 --chunk-frames 8 \
               -o "$out/long256.json" 2>&1 | tee "$out/long256.txt" ;;
    widetests) python3 -m pytest -q -o addopts=-ra tests/test_engine_cuda.py tests/test_kernels.py \
                 tests/test_kernel_layouts.py -k "alone_and_in_a_full or programmatic or 256-row or 64-row or folded_into \
                 or wider or busy_slot" 2>&1 | tee "$out/widetests.txt" || true ;;
    compile) csm bench --random-weights --compile --batch 1 --chunk-frames 8 --frames 100 --reps 3 \
               -o "$out/compile.json" 2>&1 | tee "$out/compile.txt" ;;
    hfdebug) CUDA_LAUNCH_BLOCKING=1 CSMCLI_DEBUG=1 python3 -m csmcli bench --random-weights --compare transformers \
               --frames 4 --reps 1 --warmup 0 --no-decode 2>&1 | grep -v Assertion | tail -40 | tee "$out/hfdebug.txt" || true ;;
    compare) csm bench --random-weights --batch 1 --chunk-frames 8 --frames 50 --reps 3 --compare transformers \
               -o "$out/compare.json" 2>&1 | tee "$out/compare.txt" ;;
    profile) python3 scripts/profile_frame.py 2>&1 | tee "$out/profile.txt" ;;
    profilefp8) python3 scripts/profile_frame.py fp8 2>&1 | tee "$out/profilefp8.txt" ;;
    profileprefill) python3 scripts/profile_frame.py prefill 2>&1 | tee "$out/profileprefill.txt" ;;
    mimi) python3 scripts/profile_mimi.py 2>&1 | grep -v Warn | tee "$out/mimi.txt" ;;
    admission) python3 scripts/profile_mimi.py admission 2>&1 | grep -v Warn | tee "$out/admission.txt" ;;
    mimiwide) python3 scripts/profile_mimi.py wide 2>&1 | grep -v Warn | tee "$out/mimiwide.txt" ;;
    layouts) python3 scripts/profile_mimi.py layouts 2>&1 | grep -v Warn | tee "$out/layouts.txt" ;;
    chunks) python3 scripts/profile_mimi.py chunks 2>&1 | grep -v Warn | tee "$out/chunks.txt" ;;
    matmuls) python3 scripts/profile_mimi.py matmuls 2>&1 | grep -v Warn | tee "$out/matmuls.txt" ;;
    enginetests) python3 -m pytest -q -o addopts=-ra tests/test_engine_cuda.py 2>&1 | tee "$out/enginetests.txt" || true ;;
    kerneltests) python3 -m pytest -q -o addopts=-ra tests/test_kernels.py 2>&1 | tee "$out/kerneltests.txt" || true ;;
    codectests) python3 -m pytest -q -o addopts=-ra tests/test_codec_cuda.py tests/test_codec.py 2>&1 | tee "$out/codectests.txt" || true ;;
    say|sayfp8)  # the user's commands end to end on the GPU (random weights, the tests' tiny BPE tokenizer)
      python3 -c "import sys; sys.path.insert(0, 'tests'); import tiny, pathlib; tiny.save_tokenizer(pathlib.Path('/tmp/tok'))"
      flags=(--random-weights --tokenizer /tmp/tok --seed 7 --max-seconds 2)
      [ "$step" = sayfp8 ] && flags+=(--fp8)
      csm say "${flags[@]}" -o "$out/$step.wav" --save-codes "$out/$step.npy" \
        "Hello there from the GPU. This is a second sentence, spoken after the first." 2>&1 | tee "$out/$step.txt"
      csm stream "${flags[@]}" --no-play -o - --raw --save-codes "$out/${step}_stream.npy" \
        "Streaming straight to standard output." >"$out/${step}_stream.raw" 2>"$out/${step}_stream.txt"
      tail -5 "$out/${step}_stream.txt"
      python3 scripts/check_audio_length.py "$out/$step.wav" "$out/$step.npy" "$out/${step}_stream.raw" \
        "$out/${step}_stream.npy" | tee "$out/${step}_check.txt" ;;
    startup)  # `say` from process start to exit, from a full-size random checkpoint in the HF layout: cold (an empty
      # Triton cache, the page cache dropped where allowed), Triton's cache warm but the page cache dropped, and
      # both warm; then scripts/startup_probe.py's phases with Triton's cache warm (STARTUP_COLD_PROBE=1: and empty)
      [ -f /tmp/csm-full/model.safetensors ] || python3 scripts/save_random_checkpoint.py /tmp/csm-full 2>&1 \
        | grep -v Warn | tee "$out/startup.txt"
      rm -rf /tmp/triton-startup /tmp/triton-probe
      for run in cold disk-cold warm; do
        if [ "$run" != warm ]; then
          { sync && echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null && echo "$run: page cache dropped" | tee -a "$out/startup.txt"
        fi
        t0=$(date +%s.%N)
        TRITON_CACHE_DIR=/tmp/triton-startup csm -v say --model /tmp/csm-full --seed 7 --max-seconds 2 \
          -o "$out/startup_$run.wav" "Hello there from a $run start." 2>&1 | grep -v "^\[transformers\]" | tee -a "$out/startup.txt"
        echo "$run: $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}") s from process start to exit" | tee -a "$out/startup.txt"
      done
      echo "--- phases, Triton cache warm" | tee -a "$out/startup.txt"
      TRITON_CACHE_DIR=/tmp/triton-startup python3 scripts/startup_probe.py /tmp/csm-full 2>&1 | grep -v "^\[transformers\]" | tee -a "$out/startup.txt"
      if [ -n "${STARTUP_COLD_PROBE:-}" ]; then  # the phases again with an empty Triton cache: compile times
        echo "--- phases, Triton cache empty" | tee -a "$out/startup.txt"
        TRITON_CACHE_DIR=/tmp/triton-probe python3 scripts/startup_probe.py /tmp/csm-full 2>&1 | grep -v "^\[transformers\]" | tee -a "$out/startup.txt"
      fi ;;
    compileprobe)  # a say warm-up with an empty Triton cache: kernels compiled one by one, or ahead on threads
      for mode in plain ahead; do python3 scripts/compile_probe.py $mode 2>&1 | grep -v "^\[transformers\]" \
        | tee -a "$out/compileprobe.txt"; done ;;
    loadprobe)  # where loading a full-size float32 checkpoint onto the GPU goes (scripts/load_probe.py)
      [ -f /tmp/csm-full/model.safetensors ] || python3 scripts/save_random_checkpoint.py /tmp/csm-full 2>&1 | grep -v Warn
      python3 scripts/load_probe.py /tmp/csm-full 2>&1 | grep -v "^\[transformers\]" | tee "$out/loadprobe.txt" ;;
    ingraph) python3 scripts/tune_in_graph.py 1 2>&1 | tee "$out/ingraph.txt" ;;
    ingraphfp8) python3 scripts/tune_in_graph.py 1 fp8 2>&1 | tee "$out/ingraphfp8.txt" ;;
    ingraphdec) python3 scripts/tune_in_graph.py 1 dec 2>&1 | tee "$out/ingraphdec.txt" ;;
    ingraph16) python3 scripts/tune_in_graph.py 16 dec 2>&1 | tee "$out/ingraph16.txt" ;;
    ingraph64) python3 scripts/tune_in_graph.py 64 dec 2>&1 | tee "$out/ingraph64.txt" ;;
    ingraph64all) python3 scripts/tune_in_graph.py 64 2>&1 | tee "$out/ingraph64all.txt" ;;
    ingraph128|ingraph256) python3 scripts/tune_in_graph.py "${step#ingraph}" dec 2>&1 | tee "$out/$step.txt" ;;
    ingraph64fp8) python3 scripts/tune_in_graph.py 64 fp8 dec 2>&1 | tee "$out/ingraph64fp8.txt" ;;
    knobs) python3 scripts/tune_in_graph.py 1 knobs 2>&1 | tee "$out/knobs.txt" ;;
    knobs16) python3 scripts/tune_in_graph.py 16 knobs 2>&1 | tee "$out/knobs16.txt" ;;
    knobs64) python3 scripts/tune_in_graph.py 64 knobs 2>&1 | tee "$out/knobs64.txt" ;;
    steptests) python3 -m pytest -q -o addopts=-ra tests/test_kernels.py -k "transformer_step or fused_frame or embed_sum" 2>&1 \
                 | tee "$out/steptests.txt" || true ;;
    sampletests) python3 -m pytest -q -o addopts=-ra tests/test_kernels.py -k sample 2>&1 | tee "$out/sampletests.txt" || true ;;
    tileasm) python3 scripts/tile_asm.py 2>&1 | tee "$out/tileasm.txt" ;;
    persist) python3 scripts/persist_probe.py 2>&1 | grep -v Warn | tee "$out/persist.txt" ;;
    census) python3 scripts/persist_probe.py census 2>&1 | grep -v Warn | tee "$out/census.txt" ;;
    bigk16|bigk64) python3 scripts/tune_in_graph.py "${step#bigk}" bigk 2>&1 | tee "$out/$step.txt" ;;
    deep64) python3 scripts/tune_in_graph.py 64 deep 2>&1 | tee "$out/deep64.txt" ;;
    sweepwith=*=*)  # sweepwith=NAME=VALUE: the sweep with one csmcli.kernels constant changed (scripts/bench_with.py)
      knob=${step#sweepwith=}
      python3 scripts/bench_with.py "${knob%%=*}" "${knob#*=}" bench --random-weights --batch 1,4,16,64 \
        --chunk-frames 8 --frames 60 --reps 3 -o "$out/sweepwith.json" 2>&1 | tee "$out/sweepwith.txt" ;;
    knob[0-9]*=*)  # knobROWS=NAME: one of tune_in_graph.py's KNOBS at one rows bucket
      rows=${step#knob}; rows=${rows%%=*}
      python3 scripts/tune_in_graph.py "$rows" knobs "knob=${step#*=}" 2>&1 | tee "$out/$step.txt" ;;
    l2persist) for rows in 64 16 1; do python3 scripts/l2_persist_probe.py $rows 2>&1 | grep -v Warn; done \
                 | tee "$out/l2persist.txt" ;;
    chunkgap) for rows in 64 16 1; do python3 scripts/chunk_gap_probe.py $rows 2>&1 | grep -v Warn; done \
                | tee "$out/chunkgap.txt" ;;
    overlap) python3 scripts/overlap_probe.py 2>&1 | grep -v Warn | tee "$out/overlap.txt" ;;
    ncu)  # Nsight Compute on one 64-row decoder layer step, head, draw and backbone layer step (scripts/ncu_probe.py)
      ncu_bin=$(command -v ncu || find /opt/nvidia -name ncu -type f | head -1)
      CSMCLI_NO_PDL=1 "$ncu_bin" --profile-from-start off --clock-control none --set full -f -o "$out/ncu" \
        python3 scripts/ncu_probe.py 2>&1 | grep -v Warn | tail -5
      "$ncu_bin" --import "$out/ncu.ncu-rep" --page details > "$out/ncu_details.txt"
      "$ncu_bin" --import "$out/ncu.ncu-rep" --page raw --csv > "$out/ncu_raw.csv"
      # per-instruction stall samples of the 64-row decoder gate/up (the 4th kernel profiled)
      "$ncu_bin" --import "$out/ncu.ncu-rep" --page source --print-source sass --csv --launch-skip 3 \
        --launch-count 1 > "$out/ncu_src_gateup.csv" || true
      grep -E "^  [a-z_]+kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config" \
        "$out/ncu_details.txt" | head -150 ;;
    folded) python3 scripts/layer_probe.py folded 2>&1 | tee "$out/folded.txt" ;;
    squarestests) python3 scripts/engine_tests_with.py SHARE_SQUARES 1 2>&1 | tee "$out/squarestests.txt" || true ;;
    gemm64) python3 scripts/gemm64_probe.py 2>&1 | grep -v Warn | tee "$out/gemm64.txt" ;;
    wgmma) python3 scripts/gemm64_probe.py wgmma 2>&1 | grep -v Warn | tee "$out/wgmma.txt" ;;
    gemm64small2) python3 scripts/gemm64_probe.py small2 2>&1 | grep -v Warn | tee "$out/gemm64small2.txt" ;;
    gemm64small) python3 scripts/gemm64_probe.py small 2>&1 | grep -v Warn | tee "$out/gemm64small.txt" ;;
    stream) python3 scripts/stream_probe.py 2>&1 | grep -v Warn | tee "$out/stream.txt" ;;
    floors) python3 scripts/stream_probe.py floors 2>&1 | grep -v Warn | tee "$out/floors.txt" ;;
    gemm64ncu)  # Nsight Compute on the hand-written 64-row products and the Triton tiles (scripts/gemm64_ncu.py)
      ncu_bin=$(command -v ncu || find /opt/nvidia -name ncu -type f | head -1)
      CSMCLI_NO_PDL=1 "$ncu_bin" --profile-from-start off --clock-control none --set full -f -o "$out/g64ncu" \
        python3 scripts/gemm64_ncu.py ${GEMM64_NCU_ARGS:+"$GEMM64_NCU_ARGS"} 2>&1 | grep -v Warn | tail -5
      "$ncu_bin" --import "$out/g64ncu.ncu-rep" --page details > "$out/g64ncu_details.txt"
      "$ncu_bin" --import "$out/g64ncu.ncu-rep" --page source --print-source sass --csv --launch-count 1 \
        > "$out/g64ncu_src_gateup.csv" || true
      grep -E "^  [a-zA-Z_0-9]+|Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Achieved Occupancy|Registers Per|Stall|Issued Warp|No Eligible|Active Warps Per" \
        "$out/g64ncu_details.txt" | head -150 ;;
    withx) python3 scripts/stream_probe.py withx 2>&1 | grep -v Warn | tee "$out/withx.txt" ;;
    fp8probe) python3 scripts/fp8_probe.py "${FP8_PROBE_SHAPES:-}" 2>&1 | grep -v Warn | tee "$out/fp8probe.txt" ;;
    xtma) python3 scripts/x_tma_probe.py 2>&1 | grep -v Warn | tee "$out/xtma.txt" ;;
    diag) python3 scripts/diag_batch.py 2>&1 | grep -v Warn | tee "$out/diag.txt" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
