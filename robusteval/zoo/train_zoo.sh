#!/usr/bin/env bash
# Rebuild the bundled Fashion-MNIST zoo with the bundled trainer (each command is also stored in its
# checkpoint's metadata and listed in README.md here). Needs the full Fashion-MNIST training set
# (apt-get install dataset-fashion-mnist). Two runs at a time with one thread each: on 2 cores this is
# the fastest layout (two threads per run oversubscribe the cores).
set -euo pipefail
cd "$(dirname "$0")"
common="--arch small_cnn --dataset fashion-mnist --eps 0.1 --epochs 4 --eps-ramp-epochs 1 --lr-decay-epochs 3 --n-train 15000 --eval-n 250 --seed 0 --threads 1 --quiet"
job() {
  local name=$1; shift
  # shellcheck disable=SC2086
  robusteval train "$@" $common --out "fmnist-$name.pt" > "fmnist-$name.log" 2>&1
}
export -f job; export common
printf '%s\n' \
  "llr10 --method llr --steps 10" "adv10 --method adversarial --steps 10" \
  "llr2 --method llr --steps 2" "adv2 --method adversarial --steps 2" \
  "adv1 --method adversarial --steps 1" "nominal --method nominal" |
  xargs -P 2 -I{} bash -c 'job {}'
tail -n 1 fmnist-*.log
