#!/usr/bin/env bash
# Download what llama_caption needs. Parts: llama, coco, karpathy (default: all three).
#
#   PRESIGNED_URL='https://...*...' MODEL_SIZE=7B,13B ./download.sh llama
#   ./download.sh coco karpathy
#
# LLaMA (as Meta's v1 script): PRESIGNED_URL is the URL from Meta's e-mail, with '*' where the
# file path goes; MODEL_SIZE a comma list of 7B, 13B, 30B, 65B; TARGET_FOLDER (./llama) gets
# tokenizer.model and one folder per model, each checked against Meta's checklist.chk (md5).
# COCO 2014 (train/val images, caption annotations) and Karpathy's split go to COCO_DIR (./coco).
# Every URL can be overridden: COCO_TRAIN_URL, COCO_VAL_URL, COCO_ANN_URL, KARPATHY_URL (and
# COCO_*_MD5 / KARPATHY_MD5 to check an archive against a known md5).
# Interrupted downloads resume (*.part files); files already there and verified are skipped.
set -euo pipefail

TARGET_FOLDER=${TARGET_FOLDER:-./llama}
MODEL_SIZE=${MODEL_SIZE:-7B}
COCO_DIR=${COCO_DIR:-./coco}
COCO_TRAIN_URL=${COCO_TRAIN_URL:-http://images.cocodataset.org/zips/train2014.zip}
COCO_VAL_URL=${COCO_VAL_URL:-http://images.cocodataset.org/zips/val2014.zip}
COCO_ANN_URL=${COCO_ANN_URL:-http://images.cocodataset.org/annotations/annotations_trainval2014.zip}
KARPATHY_URL=${KARPATHY_URL:-https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip}
PYTHON=${PYTHON:-python3}

say() { echo "[download.sh] $*"; }
die() { echo "[download.sh] error: $*" >&2; exit 1; }

# fetch URL DEST: download to DEST.part (resuming it when the server allows), then rename.
fetch() {
  local url=$1 dest=$2
  mkdir -p "$(dirname "$dest")"
  say "downloading $dest"
  if ! curl -fL --retry 3 --silent --show-error -C - -o "$dest.part" "$url"; then
    # The server may not resume (no byte ranges): start again from zero once.
    rm -f "$dest.part"
    curl -fL --retry 3 --silent --show-error -o "$dest.part" "$url" || die "could not download $url"
  fi
  mv "$dest.part" "$dest"
}

md5_ok() {  # md5_ok FILE MD5
  [ -f "$1" ] && [ "$(md5sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# LLaMA: every file named in a checklist is fetched unless present with the right md5.
fetch_checked() {  # fetch_checked CHECKLIST_PATH URL_PREFIX_DIR FOLDER
  local chk=$1 rel=$2 folder=$3 sum name
  while read -r sum name; do
    [ -n "$name" ] || continue
    if md5_ok "$folder/$name" "$sum"; then
      say "$folder/$name is already there and verified"
    else
      fetch "${PRESIGNED_URL/'*'/"$rel$name"}" "$folder/$name"
    fi
  done < "$chk"
  (cd "$folder" && md5sum --quiet -c "$(basename "$chk")") || {
    (cd "$folder" && md5sum -c "$(basename "$chk")" 2>/dev/null | grep -v ': OK$' | cut -d: -f1 | xargs -r rm -f) || true
    die "checksum mismatch in $folder (see above); the corrupt file was removed: run ./download.sh llama again"
  }
}

download_llama() {
  [ -n "${PRESIGNED_URL:-}" ] || die "set PRESIGNED_URL to the URL from Meta's e-mail (with '*' for the file path)"
  mkdir -p "$TARGET_FOLDER"
  [ -f "$TARGET_FOLDER/tokenizer_checklist.chk" ] || fetch "${PRESIGNED_URL/'*'/tokenizer_checklist.chk}" "$TARGET_FOLDER/tokenizer_checklist.chk"
  fetch_checked "$TARGET_FOLDER/tokenizer_checklist.chk" "" "$TARGET_FOLDER"
  local m
  for m in ${MODEL_SIZE//,/ }; do
    case "$m" in 7B|13B|30B|65B) ;; *) die "MODEL_SIZE has $m; use 7B, 13B, 30B or 65B";; esac
    mkdir -p "$TARGET_FOLDER/$m"
    [ -f "$TARGET_FOLDER/$m/checklist.chk" ] || fetch "${PRESIGNED_URL/'*'/"$m/checklist.chk"}" "$TARGET_FOLDER/$m/checklist.chk"
    fetch_checked "$TARGET_FOLDER/$m/checklist.chk" "$m/" "$TARGET_FOLDER/$m"
    say "LLaMA $m verified in $TARGET_FOLDER/$m"
  done
}

# An archive: fetched, tested (zip CRCs, and an md5 when given), extracted, then marked done.
fetch_zip() {  # fetch_zip NAME URL MD5
  local name=$1 url=$2 md5=${3:-} zip="$COCO_DIR/zips/$1.zip" mark="$COCO_DIR/.$1.done"
  if [ -f "$mark" ]; then say "$name is already there and verified"; return; fi
  [ -f "$zip" ] || fetch "$url" "$zip"
  if [ -n "$md5" ] && ! md5_ok "$zip" "$md5"; then rm -f "$zip"; die "$zip does not match its md5; removed: run again"; fi
  "$PYTHON" -m zipfile -t "$zip" >/dev/null 2>&1 || { rm -f "$zip"; die "$zip is corrupt; removed: run again"; }
  say "extracting $zip"
  "$PYTHON" -m zipfile -e "$zip" "$COCO_DIR"
  touch "$mark"
}

download_coco() {
  mkdir -p "$COCO_DIR"
  fetch_zip annotations_trainval2014 "$COCO_ANN_URL" "${COCO_ANN_MD5:-}"
  fetch_zip train2014 "$COCO_TRAIN_URL" "${COCO_TRAIN_MD5:-}"
  fetch_zip val2014 "$COCO_VAL_URL" "${COCO_VAL_MD5:-}"
  say "COCO 2014 in $COCO_DIR (train2014/, val2014/, annotations/)"
}

download_karpathy() {
  mkdir -p "$COCO_DIR"
  fetch_zip caption_datasets "$KARPATHY_URL" "${KARPATHY_MD5:-}"
  [ -f "$COCO_DIR/dataset_coco.json" ] || die "$KARPATHY_URL did not contain dataset_coco.json"
  say "Karpathy split: $COCO_DIR/dataset_coco.json"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(llama coco karpathy)
for p in "${parts[@]}"; do
  case "$p" in
    llama) download_llama ;;
    coco) download_coco ;;
    karpathy) download_karpathy ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown part '$p': use llama, coco or karpathy" ;;
  esac
done
