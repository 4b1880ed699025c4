#!/usr/bin/env bash
# The GPU checks, in one call on a machine with an NVIDIA GPU (see docs/performance.md):
# fixed-shape decoders against generate on CUDA; a cross-entropy training and captions in fp16
# through torchrun/NCCL (fp32 over gloo with DEVICE=cpu) with every --decoder and --quantize
# mode on the demo's stand-ins; then
# the CUDA-graph decoder, bench-quantize and bench at LLaMA-7B's shape. Each step has its own time limit; logs go to $OUT.
# Run from the repository root after `make demo`:  OUT=gpu_out llama_caption/tools/gpu/check.sh
#   DEMO=folder with standins/ data/ features/ (default demo_runs/full, the demo's)
#   SITE=a folder put first on PYTHONPATH (packages the machine lacks); PY=the python (.venv's if any)
#   DEVICE=cuda (cpu for a dry run: no cuda_graph, no 7B benches); BUDGET=seconds for all steps (560)
set -u
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
DEMO=${DEMO:-demo_runs/full}; DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT  # what matters is copied to $OUT
DEADLINE=$(( $(date +%s) + ${BUDGET:-560} ))  # every step ends by then (the device call's limit is 600 s)
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  (( limit > DEADLINE - t0 )) && limit=$(( DEADLINE - t0 ))
  (( limit < 10 )) && { echo "=== $name: skipped, out of time"; return; }
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "it/s\]\|s/it\]\|^ *$" "$OUT/$name.log" | tail -n "${TAIL:-25}"
  echo "=== $name: rc $rc in $(( $(date +%s) - t0 ))s"
}
nvidia-smi -L 2>/dev/null
$PY -c "import torch, fairscale, clip, torchao, bitsandbytes, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchao', torchao.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -3

step decoders 120 $PY -m llama_caption.tools.gpu.decoders $([ "$DEVICE" = cpu ] && echo --cpu)

A=$DEMO/data/annotations
COMMON=(--ckpt_dir "$DEMO/standins/llama" --tokenizer_path "$DEMO/standins/tokenizer.model" --clip_model "$DEMO/standins/clip.pt" --device "$DEVICE")
step train 100 $PY -m torch.distributed.run --nproc_per_node 1 -m llama_caption train "${COMMON[@]}" \
  --train_images "$DEMO/data/train2014" --train_annotations "$A/captions_train2014.json" --features "$DEMO/features/train" \
  --val_images "$DEMO/data/val2014" --val_annotations "$A/captions_val2014.json" --val_features "$DEMO/features/val" \
  --prefix_len 4 --num_workers 0 --log_every 20 --save_every 100000 --out_dir "$RUN/xe" --projection mlp \
  --epochs "${EPOCHS:-2}" --batch_size 64 --lr 0.004 --warmup_steps 50
cap() {  # cap NAME FLAGS...: caption val with the trained projection, no Java scoring
  local COMMON=(--ckpt_dir "$DEMO/standins/llama" --tokenizer_path "$DEMO/standins/tokenizer.model" --clip_model "$DEMO/standins/clip.pt" --device "$DEVICE")
  $PY -m torch.distributed.run --nproc_per_node 1 -m llama_caption caption "${COMMON[@]}" --checkpoint "$RUN/xe" \
    --images "$DEMO/data/val2014" --annotations "$A/captions_val2014.json" --out "$RUN/$1.json" --batch_size 50 \
    --num_workers 0 --evaluate False "${@:2}"
}
captions() {
  local modes="eager static compile"; [ "$DEVICE" = cuda ] && modes="$modes cuda_graph"
  for d in $modes; do echo "--- decoder $d"; cap "$d" --decoder "$d" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -4; done
  for q in int8 int4 nf4; do echo "--- quantize $q"; cap "$q" --quantize "$q" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -4; done
  echo "--- bf16"; cap bf16 --dtype bf16 2>&1 | tail -2
  local files=(); for f in eager static compile cuda_graph int8 int4 nf4 bf16; do [ -f "$RUN/$f.json" ] && files+=("$RUN/$f.json"); done
  $PY -m llama_caption.tools.gpu.compare "$A/captions_val2014.json" "${files[@]}"
}
export -f cap captions; export DEMO DEVICE PY RUN A
TAIL=40 step captions 200 bash -c captions
cp "$RUN/xe/metrics.jsonl" "$RUN/train_metrics.jsonl" 2>/dev/null
tar -czf "$OUT/captions.tar.gz" -C "$RUN" $(cd "$RUN" && ls *.json *.jsonl 2>/dev/null)  # few files come back: one archive

if [ "$DEVICE" = cuda ]; then
  step graph7b 60 $PY -m llama_caption.tools.gpu.graph7b
  # int8 and int4 against fp16 (the issue's targets; nf4 was measured before): three 7B models held at once.
  step bench_quantize 150 $PY -m llama_caption bench-quantize --config 7b --demo '' --quantize '["int8","int4"]' --out "$OUT/bench_quantize.json"
  step bench 300 $PY -m llama_caption bench --config 7b --decoders '["static","cuda_graph"]' --out "$OUT/bench.json"
fi
