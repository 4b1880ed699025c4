#!/usr/bin/env bash
# GPU check of the CUDA-graph decoder in `caption` and in the server: fp32 captions of --decoder
# auto (cuda_graph on one GPU) against eager, then the caption server (dynamic batching) with
# --decoder cuda_graph under loadtest, its captions checked against offline ones (not yet run on
# a GPU: the server's auto stays eager until it is). CKPT: a trained run folder; DEMO, SITE, PY, DEVICE as in gpu_check.sh.
set -u
OUT=${OUT:-/tmp/gpu_serve_out}; mkdir -p "$OUT"
DEMO=${DEMO:-demo_runs/full}; CKPT=${CKPT:?a trained run folder, e.g. CKPT=demo_runs/full/runs/001/scst}; PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}; DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
L=(--ckpt_dir "$DEMO/standins/llama" --tokenizer_path "$DEMO/standins/tokenizer.model" --clip_model "$DEMO/standins/clip.pt" --device "$DEVICE" --dtype fp32 --checkpoint "$CKPT")
for d in eager auto; do
  timeout 60 $PY -m llama_caption caption "${L[@]}" --images "$DEMO/data/val2014" --annotations "$DEMO/data/annotations/captions_val2014.json" --out "$OUT/$d.json" --batch_size 50 \
    --num_workers 0 --evaluate False --decoder $d 2>&1 | grep -v "it/s\]\|Configuration class" | tail -3
  $PY -c "import json,sys; print('$d: decoding', json.load(open('$OUT/$d.run.json')).get('decoding'))" 2>&1 | tail -1
done
$PY -m llama_caption.tools.gpu.compare "$DEMO/data/annotations/captions_val2014.json" "$OUT/eager.json" "$OUT/auto.json"
timeout 60 $PY -m llama_caption caption "${L[@]}" --images "$DEMO/data/val2014" --out "$OUT/files.json" --batch_size 50 \
  --num_workers 0 --evaluate False --decoder eager 2>&1 | tail -1  # keyed by file name, for loadtest --expected
serve_decoder=cuda_graph; [ "$DEVICE" = cuda ] || serve_decoder=static
timeout 100 $PY -m llama_caption serve "${L[@]}" --decoder $serve_decoder --port 8123 > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; pkill -f "llama_caption serve .*--port 8123" 2>/dev/null' EXIT
get() { $PY -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8123$1').read().decode())" 2>/dev/null; }
ready=""
for i in $(seq 60); do get /health >/dev/null && { ready=1; break; }; sleep 1; done
[ -n "$ready" ] || { echo "the server did not come up in 60 s:"; tail -5 "$OUT/serve.log"; exit 1; }
echo "server ready after ${i}s"
timeout 60 $PY -m llama_caption loadtest http://127.0.0.1:8123 "$DEMO/data/val2014" --concurrency 1 8 32 --requests 64 \
  --expected "$OUT/files.json" 2>&1 | grep -v "it/s\]\|Configuration class" | tail -15
get /v1/model | $PY -c "import json, sys; d = json.load(sys.stdin); print('server decoding:', d.get('decoding'))"
grep -i "decoder\|error\|Traceback" "$OUT/serve.log" | head -5
