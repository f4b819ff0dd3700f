#!/usr/bin/env bash
# The project's one-shot GPU check (fits in ~10 minutes on one H200):
#   1. the CUDA tests (stream executor == sequential executor, no host sync in steady state),
#      the optimizer equivalence tests and the CUDA-path tests on the GPU's torch;
#   2. the training-step benchmark for ResNet-50, bf16, channels-last, synthetic data, 256 per
#      GPU: vanilla, tau = 0 and tau = 1, and both with distillation from 2 ResNet-50 teachers
#      on the side stream (step time, img/s, overlap, peak memory per mode);
#   3. the optimizer-step benchmark on the GPU;
#   4. torch.compile against eager (ResNet-50, tau = 1: steady step time, graphs compiled);
#   5. the checkpoint stall of ResNet-50 with ConAdv (host copy + background write);
#   6. the data pipeline: the plain view and the published three-view recipe (clean +
#      AutoAugment; the adversarial view is the trainer's) by the torchvision path and by DALI
#      (nvJPEG "mixed" decode + crop, the policy on the GPU) when DALI is installed, in img/s
#      and host CPU ms per image;
#   7. attack ranks (2 trainers + 1 attack rank against 2 trainers with the attack inline) when
#      the machine has a GPU per rank; one GPU cannot show it (NCCL refuses two ranks on one
#      GPU, and ranks sharing a GPU would share its time), so it says so and skips.
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
timeout 150 "$python" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py \
  tests/test_optim.py tests/test_gpu_path.py 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 300 "$python" -m benchmarks.step_throughput --device cuda --arch resnet50 --batch 256 \
  --image-size 224 --precision bf16 --channels-last --rounds 3 --steps 8 --warmup 4 --teachers 2 \
  --out "$out/step_throughput.json" 2>&1 | grep -v " INFO " | tee "$out/step_throughput.txt" \
  || status=1
timeout 90 "$python" -m benchmarks.optimizer_step --device cuda --rounds 4 --steps 10 \
  --out "$out/optimizer_step.json" 2>&1 | tee "$out/optimizer_step.txt" || status=1
timeout 240 "$python" -m benchmarks.compile_speed --device cuda --arch resnet50 --batch 256 \
  --image-size 224 --precision bf16 --channels-last --count 20 \
  --out "$out/compile_speed.json" 2>&1 | grep -v " INFO " | tee "$out/compile_speed.txt" \
  || status=1
timeout 120 "$python" -m benchmarks.checkpoint_stall --device cuda --arch resnet50 --batch 256 \
  --image-size 224 --precision bf16 --channels-last --rounds 3 \
  --out "$out/checkpoint_stall.json" 2>&1 | grep -v " INFO " | tee "$out/checkpoint_stall.txt" \
  || status=1
timeout 150 "$python" -m benchmarks.data_pipeline --images 512 --workers 8 --repeats 2 \
  --out "$out/data_pipeline.json" 2>&1 | tee "$out/data_pipeline.txt" || status=1
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 3 ]; then
  timeout 240 "$python" -m benchmarks.attack_ranks --device cuda --steps 30 \
    --out "$out/attack_ranks.json" 2>&1 | tee "$out/attack_ranks.txt" || status=1
else
  echo "attack ranks: skipped, $gpus GPU(s): a trainer and an attack rank need a GPU each" \
    | tee "$out/attack_ranks.txt"
fi
exit "$status"
