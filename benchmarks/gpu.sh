#!/usr/bin/env bash
# Every benchmark on a CUDA machine, each log under $OUT (default: ./gpu-logs).
# Run from the repository root: bash benchmarks/gpu.sh [BENCHMARK ...]
# (default: syncs optim graphs local_entropy diffusion monitor spectrum_scale realistic).
set -u
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
run() {  # NAME SECONDS ARGS...: one benchmark, its log in $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" python benchmarks/"$@" --device cuda 2>&1 | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
for bench in "${@:-syncs optim graphs local_entropy diffusion monitor spectrum_scale realistic}"; do
    for b in $bench; do
        case $b in
            syncs) run syncs 120 syncs.py ;;
            optim) run optim 240 optim.py --repeats 30 ;;
            graphs) run graphs 180 graphs.py ;;
            local_entropy) run local_entropy 120 local_entropy.py --repeats 30 ;;
            diffusion) run diffusion 150 diffusion.py --repeats 30 ;;
            monitor) run monitor 60 monitor.py ;;
            spectrum_scale) run spectrum_scale 240 spectrum_scale.py --methods block-lanczos:10 --full-n 50000 ;;
            realistic)  # ResNet-18 at B = 128; GPT-2 small (124M) at 8 x 512 tokens, bf16
                run realistic-resnet18 300 realistic.py --size full --models resnet18
                run realistic-gpt-bf16 300 realistic.py --size full --models gpt --autocast bf16 ;;
            *) echo "unknown benchmark: $b" ;;
        esac
    done
done
