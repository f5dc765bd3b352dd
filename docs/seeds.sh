#!/usr/bin/env bash
# The multi-seed studies of docs/reproduction.md ("Training randomness"), and the copies of their reports committed
# under docs/results/. Each study runs once per training seed in runs/NAME/seed-S/ (resumable: rerunning this script
# skips every finished stage) and writes the seed-level report runs/NAME/seeds.md / seeds.json. The copies keep the
# seed-level report and each seed's report.md / report.json / stages.json, without figures or models (the command
# regenerates them). Then the agreement of the robust flags across seeds, for M, M_R and M_rand of the Fashion-MNIST
# study at the paper's reading (the study's own evaluations, and seed 0's M under noise seed 1 as the ceiling).
# On 2 CPU cores: Fashion-MNIST about 6 minutes per seed (58 minutes for the 10 seeds), MNIST-5k 1.5 to 2.5.
# Usage: bash docs/seeds.sh [DATA_DIR] [study ...]   (studies: fashion mnist mnist-30 fashion-30 mnist-updates)
set -euo pipefail
DATA="${1:-../shared/data}"
shift || true
STUDIES="${*:-fashion mnist mnist-30 fashion-30 mnist-updates}"

study() {  # name, dataset, reproduce options...
    local name="$1" ds="$2"
    shift 2
    pyrobust reproduce --dataset "$ds" --data-dir "$DATA" --out "runs/$name" "$@"
    local dest="docs/results/$name"
    mkdir -p "$dest"
    cp "runs/$name/seeds.md" "runs/$name/seeds.json" "$dest/"
    for s in "runs/$name"/seed-*/; do
        s="${s%/}"
        mkdir -p "$dest/${s##*/}"
        cp "$s/report.md" "$s/report.json" "$s/stages.json" "$dest/${s##*/}/"
        [ ! -f "$s/operating_point.json" ] || cp "$s/operating_point.json" "$dest/${s##*/}/"
    done
}

for name in $STUDIES; do
    case "$name" in
        fashion) study fashion-seeds fashion-mnist --train-seeds 0-9 ;;
        mnist) study mnist-seeds mnist --per-class 125 --train-seeds 0-4 ;;
        mnist-30) study mnist-seeds-30 mnist --per-class 125 --train-seeds 0-4 --target-robust 30% ;;
        fashion-30) study fashion-seeds-30 fashion-mnist --train-seeds 0-9 --target-robust 30% ;;
        mnist-updates) study mnist-seeds-updates mnist --per-class 125 --train-seeds 0-4 --retrain-budget updates ;;
        *) echo "unknown study $name (fashion, mnist, mnist-30, fashion-30, mnist-updates)" >&2; exit 2 ;;
    esac
done

case " $STUDIES " in
    *" fashion "*)
        runs=runs/fashion-seeds
        names=$(seq -s, -f 'seed%g' 0 9)
        # the ceiling: seed 0's M against itself under noise seed 1
        pyrobust evaluate "$runs/seed-0/models/M.onnx" --dataset fashion-mnist:test --data-dir "$DATA" \
            --out runs/fashion-seeds-noise-seed1 --no-report --quiet --resume --seed 1
        for m in M M_R M_rand; do
            folders=()
            for s in 0 1 2 3 4 5 6 7 8 9; do folders+=("$runs/seed-$s/eval/$m-test"); done
            pyrobust agreement "${folders[@]}" --names "$names" \
                --ceiling "$runs/seed-0/eval/M-test" runs/fashion-seeds-noise-seed1 \
                --out "docs/results/fashion-seeds/agreement/$m"
        done
        ;;
esac
