#!/usr/bin/env bash
# Cross-model agreement of robust flags (docs/reproduction.md, "Is robustness a property of the datapoint?").
# Trains M under training seeds 1-9 (seed 0 is the study's M) and an MLP, evaluates each on the full test split with
# the study's noise (28 pixels, 250 steps, uniform [0, 1), restart, noise seed 0), evaluates the study's M, M_R and
# M_rand again (the study commits their summaries, not their per-image arrays; evaluations are deterministic, so the
# numbers are the study's; failures are counted, so each image's p-hat is measured, and the first failures stay the
# same), M, M_R and M_rand again under noise seed 1 (the noise-only ceiling, and each model's retest for its
# reliability), and writes three agreement reports per dataset under docs/results/DATASET/agreement/.
# About 10 minutes for MNIST and 30 for Fashion-MNIST on 2 cores. Usage: bash docs/agreement.sh [DATA_DIR] [datasets]
set -euo pipefail
DATA="${1:-../shared/data}"
shift || true
DATASETS="${*:-mnist fashion-mnist}"
RUNS=runs/agreement
for ds in $DATASETS; do
    study="docs/results/$ds"
    work="$RUNS/$ds"
    mkdir -p "$work/models"
    ev() {  # model, folder, extra evaluate options (rerunning resumes, or finds the run complete)
        pyrobust evaluate "$1" --dataset "$ds:test" --data-dir "$DATA" --out "$2" --no-report --quiet --resume "${@:3}"
    }
    for seed in 1 2 3 4 5 6 7 8 9; do
        m="$work/models/M-seed$seed.onnx"
        [ -f "$m" ] || pyrobust train --dataset "$ds:train" --data-dir "$DATA" --arch cnn --epochs 10 --seed "$seed" \
            --out "$m"
        ev "$m" "$work/M-seed$seed"
    done
    [ -f "$work/models/MLP.onnx" ] || pyrobust train --dataset "$ds:train" --data-dir "$DATA" --arch mlp --epochs 10 \
        --seed 0 --out "$work/models/MLP.onnx"
    ev "$work/models/MLP.onnx" "$work/MLP"
    for m in M M_R M_rand; do
        ev "$study/models/$m.onnx" "$work/$m" --count-failures
        ev "$study/models/$m.onnx" "$work/$m-noise-seed1" --count-failures --seed 1
    done
    seeds=("$work/M")
    names="seed0"
    for seed in 1 2 3 4 5 6 7 8 9; do seeds+=("$work/M-seed$seed"); names="$names,seed$seed"; done
    ceiling=(--ceiling "$work/M" "$work/M-noise-seed1")
    pyrobust agreement "${seeds[@]}" --names "$names" "${ceiling[@]}" --out "$study/agreement/seeds"
    pyrobust agreement "$work/M" "$work/MLP" --names CNN,MLP "${ceiling[@]}" --out "$study/agreement/architectures"
    pyrobust agreement "$work/M" "$work/M_R" "$work/M_rand" --names M,M_R,M_rand "${ceiling[@]}" \
        --retest "$work/M-noise-seed1" --retest "$work/M_R-noise-seed1" --retest "$work/M_rand-noise-seed1" \
        --out "$study/agreement/selection"
done
