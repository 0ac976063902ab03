#!/usr/bin/env bash
# Rebuild the bundled Fashion-MNIST zoo with the bundled trainer (each command is also stored in its
# checkpoint's metadata). Needs the full Fashion-MNIST training set (apt-get install dataset-fashion-mnist).
# Two runs at a time, one thread each (fastest on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
common="--arch small_cnn --dataset fashion-mnist --eps 0.1 --epochs 4 --eps-ramp-epochs 1 --lr-decay-epochs 3 --n-train 15000 --eval-n 250 --seed 0 --threads 1 --quiet"
run() { name=$1; shift; robusteval train "$@" $common --out "fmnist-$name.pt" > "fmnist-$name.log" 2>&1; }
run nominal --method nominal &
run adv10 --method adversarial --steps 10 &
wait
run llr10 --method llr --steps 10 &
run adv1 --method adversarial --steps 1 &
wait
run adv2 --method adversarial --steps 2 &
run llr2 --method llr --steps 2 &
wait
tail -n 2 fmnist-*.log
