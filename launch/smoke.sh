#!/bin/bash
# Check a new node before real runs: software, GPUs, NCCL, DeepSpeed's ops, a short training run on
# every GPU, and a generation from its checkpoint. One PASS/FAIL line per check; exit 0 only if all pass.
#
#   bash launch/smoke.sh                 # a GPU node (run it from the neo checkout)
#   bash launch/smoke.sh --cpu           # no GPU: the same checks on the CPU (gloo, 2 processes)
#   srun --gpus-per-node=8 --ntasks=1 bash launch/smoke.sh    # a node of a SLURM cluster
#
# Outputs go to a temporary folder (or NEO_SMOKE_DIR), kept when a check fails.
set -uo pipefail

CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; fi
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
WORK=${NEO_SMOKE_DIR:-$(mktemp -d -t neo-smoke-XXXXXX)}
mkdir -p "$WORK"
FAILED=0

# check NAME TIMEOUT COMMAND...: run one check with a deadline (a hung NCCL must not hang the script).
check() {
    local name=$1 limit=$2 log="$WORK/$1.log"
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" > "$log" 2>&1; then
        echo "PASS  $name ($((SECONDS - start)) s)"
        grep '^smoke:' "$log" | sed 's/^smoke:/      /'
    else
        local rc=$?
        echo "FAIL  $name (exit $rc$([ "$rc" = 124 ] && echo ", timed out after $limit s")); last lines of $log:"
        grep -v '^smoke:' "$log" | tail -n 15 | sed 's/^/      /'
        FAILED=1
    fi
}

echo "neo smoke test on $(hostname) in $WORK"

# 1. Python packages: what is installed, and whether torch sees the GPUs.
check software 120 "$PYTHON" - "$CPU" <<'EOF'
import sys
import deepspeed, torch
import neo
print(f"smoke: python {sys.version.split()[0]}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"neo {getattr(neo, '__version__', '?')}")
if sys.argv[1] == "1":
    print("smoke: --cpu: GPUs not checked")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"CUDA is not available to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "check the driver (nvidia-smi), CUDA_VISIBLE_DEVICES, and that torch is a CUDA build")
print(f"smoke: CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.device_count()} GPU(s)")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    x = torch.ones(1024, 1024, device=f"cuda:{i}")
    assert (x @ x).sum().item() == 1024**3, f"wrong matmul result on cuda:{i}"
    print(f"smoke: cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF

if [ "$FAILED" = 1 ] && [ "$CPU" = 0 ]; then
    echo "no usable GPU: fix the above, or check the rest on the CPU with: bash launch/smoke.sh --cpu"
    exit 1
fi
if [ "$CPU" = 1 ]; then
    NPROC=2
    DTYPE=fp32
else
    NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
    DTYPE=$("$PYTHON" -c "import torch; print('bf16' if torch.cuda.is_bf16_supported() else 'fp16')" 2>/dev/null \
            || echo fp16)
fi

# 2. Collectives between all GPUs of the node (NCCL), or 2 CPU processes (gloo).
cat > "$WORK/allreduce.py" <<'EOF'
import os
import torch
import torch.distributed as dist
gpu = torch.cuda.is_available() and os.environ.get("SMOKE_CPU") != "1"
dist.init_process_group("nccl" if gpu else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
if gpu:
    torch.cuda.set_device(device)
x = torch.full((64 * 2**20 // 4,), float(rank + 1), device=device)  # 64 MiB
for _ in range(3):
    y = x.clone()
    dist.all_reduce(y)
if gpu:
    torch.cuda.synchronize()
assert torch.all(y == world * (world + 1) / 2), "all_reduce gave a wrong sum"
if rank == 0:
    print(f"smoke: all_reduce of 64 MiB over {world} rank(s) with {dist.get_backend()}: correct")
dist.destroy_process_group()
EOF
check collectives 300 env SMOKE_CPU="$CPU" "$PYTHON" -m torch.distributed.run --standalone \
    --nproc_per_node "$NPROC" "$WORK/allreduce.py"

# 3. DeepSpeed: its environment report; ops it would JIT-compile need ninja and a compiler.
ds_ops() {
    "$PYTHON" -m deepspeed.env_report > "$WORK/ds_report.txt" 2>&1 || return 1
    sed 's/\x1b\[[0-9;]*m//g' "$WORK/ds_report.txt" | grep -E '^(ninja|cpu_adam|fused_adam|torch version|nvcc version)' \
        | sed 's/^/smoke: /'
}
export -f ds_ops
export PYTHON WORK
check deepspeed-ops 180 bash -c ds_ops

# 4. Tokens for the tiny model (the bundled sample corpus), then a short run on every GPU.
TOKENS=data/tokens/sample
if [ ! -f "$TOKENS.idx" ]; then TOKENS=$WORK/tokens/sample; fi
if [ ! -f "$TOKENS.idx" ]; then
    check tokenize 300 "$PYTHON" launch/preprocess.py data/sample/austen.jsonl.gz --output "$TOKENS"
fi
train() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" launch/train.py \
        ds_configs/models/tiny.yml --set "data.train_paths=[$TOKENS]" --set "logging.dir=$WORK/run" \
        --set precision.dtype="$DTYPE" --set schedule.iterations=20 --set logging.interval=5 \
        --set eval.interval=0 || return 1
    # Judge by what the run wrote, not only its exit code.
    "$PYTHON" - "$WORK/run/metrics.jsonl" <<'EOF'
import json, math, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in recs if "loss" in r]
assert any(r.get("event") == "end" and r.get("exit_code") == 0 for r in recs), "no end record"
assert all(math.isfinite(r["loss"]) for r in steps), "non-finite loss"
assert steps[-1]["loss"] < steps[0]["loss"], f"loss did not fall: {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}"
last = [r for r in steps if "tokens_per_s" in r][-1]
print(f"smoke: loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, {last['tokens_per_s']:,.0f} tokens/s, "
      f"{last['memory_gb']:.2f} GB peak memory per rank")
EOF
}
export -f train
export TOKENS NPROC DTYPE
check train 600 bash -c train

# 5. Generation from the checkpoint the run saved.
generate() {
    "$PYTHON" launch/generate.py "$WORK/run/checkpoints" --prompt "It is a truth universally" \
        --max-new-tokens 16 --greedy --ignore-eod > "$WORK/generated.txt" || return 1
    [ -s "$WORK/generated.txt" ] || { echo "no text generated"; return 1; }
    echo "smoke: generated: \"$(tr '\n' ' ' < "$WORK/generated.txt" | cut -c1-100)\""
}
export -f generate
check generate 300 bash -c generate

if [ "$FAILED" = 0 ]; then
    echo "all checks passed"
    [ -z "${NEO_SMOKE_DIR:-}" ] && rm -rf "$WORK"
    exit 0
fi
echo "some checks failed; logs in $WORK"
exit 1
