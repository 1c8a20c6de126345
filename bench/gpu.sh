#!/usr/bin/env bash
# One prepared run of the GPU path (issue #16): the CIFAR-10 pipeline with `views: all` on the
# full 50 000 training images, on one GPU, in under 10 minutes on an H100/H200-class device.
#
#   bash bench/gpu.sh                      # full size; needs a CUDA device
#   bash bench/gpu.sh --tiny               # 256 images, 1 epoch, on whatever device there is (CPU smoke)
#
# Environment: CIFAR10_NPZ (default ../shared/data/cifar10-jpeg.npz, else shared/data/...: the
# npz layout of pipeline/datasets/npz.py), WORK (a scratch folder, default a new temp folder),
# NPROC (dump/student ranks, default 1), TEACHER_EPOCHS, STUDENT_EPOCHS.
#
# Prints: the dump's views/s against a bare forward loop of the same teacher (bench/gpu_floor.py),
# the students' training images/s (offline lessons, online KD, plain CE) and their test top-1,
# each stage's wall time; the same as JSON in $WORK/gpu-summary.json.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
NPZ=${CIFAR10_NPZ:-}
if [[ -z "$NPZ" ]]; then
  for candidate in "$ROOT/../shared/data/cifar10-jpeg.npz" "$ROOT/shared/data/cifar10-jpeg.npz"; do
    [[ -f "$candidate" ]] && NPZ=$candidate && break
  done
fi
[[ -f "${NPZ:-}" ]] || { echo "bench/gpu.sh: no CIFAR-10 npz; set CIFAR10_NPZ=/path/to/cifar10-jpeg.npz" >&2; exit 2; }
WORK=${WORK:-$(mktemp -d -t lessons-gpu-XXXXXX)}
mkdir -p "$WORK"
export DVC_NO_ANALYTICS=1 NUMBA_THREADING_LAYER=omp PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"

python3 - "$NPZ" "$TINY" "${NPROC:-1}" "${TEACHER_EPOCHS:-}" "${STUDENT_EPOCHS:-}" <<'EOF'
import sys, yaml
npz, tiny, nproc = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
teacher_epochs = int(sys.argv[4] or (1 if tiny else 15))
student_epochs = int(sys.argv[5] or (1 if tiny else 5))
batch = 64 if tiny else 512
params = {
    "data": {"name": "npz", "root": npz, "max_train_samples": 256 if tiny else None,
             "max_test_samples": 256 if tiny else None},
    "prepare_data": {"num_workers": 8},
    "teacher_train": {"teachers": {"resnet20": {
        "arch": "resnet20", "epochs": teacher_epochs, "batch_size": batch, "lr": 0.2, "device": "auto"}}},
    # 162 pad-4 crop x flip views of every image; bfloat16 autocast on tensor cores.
    "teacher_dump": {"views": "all", "batch_size": 64 if tiny else 2048, "chunk_size": 128 if tiny else 2048,
                     "device": "auto", "autocast": "bfloat16", "nproc": nproc},
    "student_train": {
        "arch": "resnet8", "epochs": student_epochs, "batch_size": batch, "lr": 0.2,
        "num_workers": 8, "device": "auto", "seeds": [0], "nproc": nproc, "amp": True,
        "experiments": {
            "ce": {"kd": False},
            "kd": {"teacher": "resnet20", "adjust": "none", "dtd": "off"},
            "kd_online": {"teacher": "resnet20", "adjust": "none", "dtd": "off", "teacher_mode": "online"},
        },
    },
}
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF

declare -A WALL
timed() {  # timed NAME command...: run it, keep its wall time
  local name=$1; shift
  local start=$SECONDS
  "$@" 2>&1 | tail -n 3
  WALL[$name]=$((SECONDS - start))
}
lessons() { python3 -m pipeline "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU: CPU run"
timed prepare lessons prepare-data --out data
timed teacher lessons teacher-train --teacher resnet20 --data data --checkpoint-out checkpoints/teachers/resnet20.pt \
  --metrics-out metrics/teacher.json --curve-out metrics/teacher-curve.json
timed floor python3 -m bench.gpu_floor --data data --checkpoint checkpoints/teachers/resnet20.pt \
  --batch-size "$([[ $TINY == 1 ]] && echo 64 || echo 2048)" --reps "$([[ $TINY == 1 ]] && echo 5 || echo 100)" \
  --autocast bfloat16 | tee metrics/floor.json
timed dump lessons teacher-dump --teacher resnet20 --data data --checkpoint checkpoints/teachers/resnet20.pt \
  --out stores/resnet20/logits.zarr --test-out stores/resnet20/test-logits.zarr
for experiment in ce kd kd_online; do
  timed "$experiment" lessons student-train --experiment "$experiment" --data data --stores stores \
    --checkpoint-out "checkpoints/$experiment.pt" --metrics-out "metrics/$experiment.json" \
    --curve-out "metrics/$experiment-curve.json"
done

python3 - "${WALL[prepare]}" "${WALL[teacher]}" "${WALL[dump]}" "${WALL[ce]}" "${WALL[kd]}" "${WALL[kd_online]}" <<'EOF'
import json, sys
from storage import open_store
prepare, teacher, dump, *students = map(int, sys.argv[1:])
floor = json.loads(open("metrics/floor.json").read().strip().splitlines()[-1])
store = open_store("stores/resnet20/logits.zarr")
views, samples, _ = store.array("logits").shape
test = open_store("stores/resnet20/test-logits.zarr").array("logits").shape[1]
dump_rate = (views * samples + test) / max(dump, 1)
summary = {
    "device": floor["device"],
    "teacher_test_top1": json.load(open("metrics/teacher.json"))["test_top1"],
    "dump": {"views": views * samples + test, "wall_s": dump, "views_per_s": round(dump_rate),
             "floor_views_per_s": floor["views_per_s"], "ratio": round(dump_rate / floor["views_per_s"], 3)},
    "students": {},
    "wall_s": {"prepare": prepare, "teacher": teacher, "dump": dump},
}
for name, wall in zip(("ce", "kd", "kd_online"), students):
    metrics = json.load(open(f"metrics/{name}.json"))
    summary["students"][name] = {"test_top1": metrics["test_top1"], "images_per_s": metrics["images_per_s"],
                                 "wall_s": wall}
json.dump(summary, open("gpu-summary.json", "w"), indent=1)
print(f"device {summary['device']}; teacher resnet20 test top-1 {summary['teacher_test_top1']:.4f}")
d = summary["dump"]
print(f"dump: {d['views']} views in {d['wall_s']} s (stage wall time, start-up included): "
      f"{d['views_per_s']} views/s; bare forward loop {d['floor_views_per_s']:.0f} views/s; ratio {d['ratio']}")
for name, s in summary["students"].items():
    print(f"student {name:9s}: {s['images_per_s']:8.0f} img/s (training steps), test top-1 {s['test_top1']:.4f}, "
          f"{s['wall_s']} s")
EOF
echo "summary: $WORK/gpu-summary.json"
