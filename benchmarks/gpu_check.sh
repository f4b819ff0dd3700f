#!/usr/bin/env bash
# The project's one-shot GPU check, within 8 minutes (the parts' limits add up to 480 s), in
# the order of what the project most needs to know, so that a check cut short still returns
# the most important numbers. Each part writes its files when it ends, and check.json (each
# part's exit status and seconds) is rewritten after every part.
#   1. CUDA tests (80 s): stream executor == sequential executor, no host sync in steady
#      state, the CUDA-path and optimizer equivalence tests on the GPU's torch;
#   2. ResNet-50 step (110 s): bf16, channels-last, synthetic data, 256 per GPU; vanilla,
#      tau = 0 and tau = 1 (step time, img/s, the measured overlap, peak memory per mode);
#   3. launch budget (40 s): device operations per step as counted on the CPU, beside the CUDA
#      kernels per step that the profiler sees, per training mode;
#   4. compile modes (100 s): eager, then torch.compile's reduce-overhead (CUDA graphs for the
#      training forward) and default on the ResNet-50 tau = 1 step, each written as it ends;
#   5. data pipeline (45 s): the plain view and the published three-view recipe by the
#      torchvision path and by DALI when installed, img/s and host CPU ms per image;
#   6. checkpoint stall (35 s): host copy + background write of ResNet-50 with ConAdv;
#   7. optimizer step (25 s): LARS and LAMB on the GPU;
#   8. attack ranks (45 s) when the machine has a GPU per rank (2 trainers + 1 attack rank);
#      one GPU cannot show it (NCCL refuses two ranks on one GPU), so it says so and skips.
# Usage, from the repository root:   benchmarks/gpu_check.sh OUT_DIR
# It runs from source (PYTHONPATH=.). Wheels in .whl/ (omegaconf, which the GPU image lacks;
# see benchmarks/README.md) are installed to /tmp/site first.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if ! "$python" -c "import omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$python" - <<'PY' | tee "$out/environment.txt"
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY

status=0
parts=()
# part NAME LIMIT_S COMMAND...: run it under its limit, its output to OUT/NAME.txt, and
# record its exit status and seconds in OUT/check.json at once
part() {
  local name=$1 limit=$2 started code
  shift 2
  started=$(date +%s)
  # (-k: what the limit's SIGTERM leaves running, e.g. loader workers, is killed 10 s later)
  timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v " INFO " | tee "$out/$name.txt"
  code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || status=1
  parts+=("\"$name\": {\"exit\": $code, \"seconds\": $(( $(date +%s) - started )), \"limit_s\": $limit}")
  local IFS=,
  printf '{%s}\n' "${parts[*]}" > "$out/check.json"
}

resnet=(--device cuda --arch resnet50 --batch 256 --image-size 224 --precision bf16
        --channels-last)
part cuda_tests 80 "$python" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py \
  tests/test_optim.py tests/test_gpu_path.py
part step_throughput 110 "$python" -m benchmarks.step_throughput "${resnet[@]}" --rounds 3 \
  --steps 8 --warmup 4 --out "$out/step_throughput.json"
part launch_budget 40 "$python" -m benchmarks.launch_budget --device cuda --size small \
  --no-host-time --out "$out/launch_budget.json"
part compile_modes 100 "$python" -m benchmarks.compile_speed "${resnet[@]}" --count 12 \
  --compile-modes reduce-overhead default --out "$out/compile_speed.json"
part data_pipeline 45 "$python" -m benchmarks.data_pipeline --images 384 --workers 8 \
  --repeats 2 --out "$out/data_pipeline.json"
part checkpoint_stall 35 "$python" -m benchmarks.checkpoint_stall "${resnet[@]}" --rounds 2 \
  --out "$out/checkpoint_stall.json"
part optimizer_step 25 "$python" -m benchmarks.optimizer_step --device cuda --rounds 3 \
  --steps 8 --out "$out/optimizer_step.json"
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 3 ]; then
  part attack_ranks 45 "$python" -m benchmarks.attack_ranks --device cuda --steps 20 \
    --out "$out/attack_ranks.json"
else
  echo "attack ranks: skipped, $gpus GPU(s): a trainer and an attack rank need a GPU each" \
    | tee "$out/attack_ranks.txt"
fi
exit "$status"
