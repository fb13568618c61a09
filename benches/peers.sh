#!/usr/bin/env bash
# Side by side with the Python peers, one after the other on this machine, on the headline task:
# MNIST multinomial logistic regression on the first 5000 training images, λ = 1e-3, the
# influence of training examples on 10 test points, against actual leave-one-out retraining.
#
#   bash ../shared/bench/peers/setup.sh     # once: PyTorch (CPU use), dattri, Kronfluence
#   bash benches/peers.sh                   # about 10 minutes on 2 cores (REUSE_PEERS=1: the
#                                           # peers' results of an earlier run, culprit again)
#
# It runs the peers' script (../shared/bench/peers/loo_lr.py: 200 exact leave-one-out retrainings
# as ground truth; the closed-form influence in PyTorch float64 and dattri's CG), then culprit on
# the same rows and test points: `cache` + `fit` + `trace` timed per curvature from a trained run
# (the training is not timed, as the peers' is not), every score written with --scores-out and
# correlated with the peers' own ground truth. It prints one table and the ratios, with the CPU
# named. A benchmark only: never part of the tests or CI. Results also go to $OUT (default
# target/peers/), one JSON file.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$HOME/.cache/culprit-peers}
peers=../shared/bench/peers
py="$PEERS/venv/bin/python"
if [ ! -x "$py" ]; then
    echo "peers.sh: no peer environment at $PEERS (run: bash $peers/setup.sh)" >&2
    exit 2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/tmp}/.cache/culprit/target}"
OUT=${OUT:-target/peers}
mkdir -p "$OUT"
cargo build --release --quiet
culprit="$CARGO_TARGET_DIR/release/culprit"
data=../shared/data/mnist
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
avx512=$(grep -q avx512f /proc/cpuinfo && echo "AVX-512" || echo "AVX2 only, no AVX-512")
echo "machine: $cpu, $(nproc) cores, $avx512"

# 1. The peers: the closed form and dattri's CG (the other estimators skipped). REUSE_PEERS=1
# keeps the results of an earlier run in $OUT.
truth="$OUT/loo_mnist_n5000_lam0.001_float32.npz"
if [ "${REUSE_PEERS:-0}" != 1 ] || [ ! -f "$truth" ]; then
    PEERS=$PEERS "$py" $peers/loo_lr.py --data mnist --n-train 5000 --n-eval 10 --n-loo 200 --lam 1e-3 \
        --threads "$(nproc)" --skip explicit,lissa,arnoldi,ek-fac,ekfac,tracin,grad-dot,trak \
        --out "$OUT" | tee "$OUT/peers.log"
fi
index=$("$py" -c "import numpy as np; print(','.join(map(str, np.load('$truth')['eval_idx'])))")

# 2. culprit, from a trained run, on the same 5000 rows and the same 10 test points.
run="$OUT/run"
rm -rf "$run"
"$culprit" train --data $data --limit 5000 --model logreg --l2 1e-3 --out "$run" --quiet
timed() { # seconds of a command, its output discarded
    local t0=$EPOCHREALTIME
    "$@" > /dev/null
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'
}
# The per-example gradients every trace reads (the peers compute theirs inside their timing).
cache=$(timed "$culprit" cache --run "$run" --quiet)
results="$OUT/culprit.tsv"
: > "$results"
# Each configuration: a name, then the flags of `fit` (the first is the curvature method).
configurations=(
    "exact|exact"
    "cg|cg"
    "cg, EK-FAC-preconditioned, tolerance 1e-2|cg --precondition --tolerance 1e-2"
    "cg, EK-FAC-preconditioned, tolerance 1e-1|cg --precondition --tolerance 1e-1"
)
for k in "${!configurations[@]}"; do
    name=${configurations[$k]%%|*}
    read -r -a flags <<< "${configurations[$k]#*|}"
    fit=$(timed "$culprit" fit --run "$run" --curvature "${flags[@]}" --quiet)
    trace=$(timed "$culprit" trace --run "$run" --data $data --split test --index "$index" \
        --curvature "${flags[0]}" --measure label --quiet --format json --scores-out "$OUT/scores_$k.csv")
    printf '%s\t%s\t%s\t%s\t%s\n' "$k" "$name" "$cache" "$fit" "$trace" >> "$results"
done

# 3. One table: time and fidelity against the same ground truth, and the ratios.
"$py" - "$OUT" "$truth" "$results" "$cpu" "$avx512" <<'EOF'
import csv, json, sys
import numpy as np
from scipy.stats import pearsonr
out, truth_path, results, cpu, avx = sys.argv[1:6]
truth = np.load(truth_path)
loo_idx, eval_idx, dL = truth["loo_idx"], truth["eval_idx"], truth["dL"][:, truth["eval_idx"]]
peers = json.load(open(truth_path.replace(".npz", ".json")))["rows"]
rows = [(r["method"], r["seconds"], r["pearson_mean"]) for r in peers if "seconds" in r]
for k, method, cache, fit, trace in csv.reader(open(results), delimiter="\t"):
    column = {int(q): k for k, q in enumerate(eval_idx)}  # a test index → its column of dL
    scores = np.zeros((len(eval_idx), 5000))
    with open(f"{out}/scores_{k}.csv") as f:
        for r in csv.DictReader(f):
            scores[column[int(r["query_index"])], int(r["train_index"])] = float(r["proponent_score"])
    s = scores[:, loo_idx].T  # (removals, queries)
    p = float(np.mean([pearsonr(s[:, j], dL[:, j])[0] for j in range(dL.shape[1])]))
    parts = f"{float(cache):.2f} + {float(fit):.2f} + {float(trace):.2f} s"
    rows.append((f"culprit cache + fit {method} + trace ({parts})", float(cache) + float(fit) + float(trace), p))
print(f"\n{cpu}, {avx}; 10 queries; Pearson: mean over the queries against 200 exact retrainings")
print(f"{'system':<84s} {'seconds':>8s} {'Pearson':>8s}")
for name, secs, p in rows:
    print(f"{name:<84s} {secs:8.2f} {p:8.4f}")
peer = [(n, s) for n, s, p in rows if not n.startswith("culprit") and p >= 0.98]
fastest = min(peer, key=lambda r: r[1])
print(f"\nfastest peer at Pearson ≥ 0.98: {fastest[0]} ({fastest[1]:.2f} s)")
for name, secs, p in rows:
    if name.startswith("culprit"):
        print(f"  {name.split(' (')[0]}: {fastest[1] / secs:.2f}× the peer's speed (Pearson {p:.4f})")
json.dump(dict(cpu=cpu, isa=avx, rows=[dict(system=n, seconds=s, pearson=p) for n, s, p in rows]),
          open(f"{out}/side_by_side.json", "w"), indent=1)
EOF

# 4. Per-example gradients, MLP 784-512-256-10 (ReLU) on MNIST: PyTorch's batched mean-loss
# backward (the one pass the factors need), its hand-written per-example outer products and
# vmap(grad), batch 256 (../shared/bench/peers/perex_grad_bench.py), beside `culprit cache` end
# to end (process start, data loading, taps, the factor rows, the checksummed shard written and
# fsynced) over 20000 images with the default exact factors. SKIP_PEREX=1 skips this part.
if [ "${SKIP_PEREX:-0}" != 1 ]; then
    perex="$OUT/perex.log"
    PEERS=$PEERS "$py" $peers/perex_grad_bench.py --threads "$(nproc)" --batch 256 --seconds 5 | tee "$perex"
    mlp="$OUT/mlp"
    rm -rf "$mlp"
    "$culprit" train --data $data --limit 20000 --model mlp --hidden 512,256 --epochs 1 --out "$mlp" --quiet
    n=20000
    seconds=$(timed "$culprit" cache --run "$mlp" --quiet)
    "$py" - "$perex" "$n" "$seconds" "$cpu" "$avx512" <<'PY'
import re, sys
log, n, seconds, cpu, avx = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"batch\s+\d+\s+(\S+)\s+(\d+) examples/s", open(log).read())}
culprit = n / seconds
print(f"\n{cpu}, {avx}; per-example gradients, MLP 784-512-256-10, examples/s")
for name in ("batched_backward", "manual_outer_flat", "vmap_grad+flat", "vmap_grad"):
    if name in rates:
        print(f"  PyTorch {name:<20s} {rates[name]:10.0f}")
print(f"  culprit cache (factors, end to end, {n} images in {seconds:.2f} s) {culprit:10.0f}")
if "batched_backward" in rates:
    print(f"  culprit cache takes {rates['batched_backward'] / culprit:.2f}× the time of PyTorch's plain batched backward")
PY
fi
