#!/usr/bin/env bash
# Side-by-side receipts: ours and the peers (Megatron-Core's TileLang / native paths, cuDNN
# frontend, CUTLASS DSL, FlashMLA's sparse forward) in one process, the peers installed from the
# wheel bundles.
#
# Usage (from the repository root, on the GPU machine):
#   bash benchmarks/side_by_side.sh PEERS_DIR install BUNDLE_DIR   # install the bundle's wheels (and
#                                                                  # FlashMLA's, .flashmla/*.whl) into PEERS_DIR
#   bash benchmarks/side_by_side.sh PEERS_DIR indexer
#   bash benchmarks/side_by_side.sh PEERS_DIR sparse_mla
#   (or --peers PEERS_DIR in place of the first argument; --bundle BUNDLE_DIR for install)
#
# PEERS_DIR: the folder the peers' install.sh installed into (pip --target). BUNDLE_DIR: the
# folder holding the bundle's wheels (split *.whl.part.* files are joined) and its install.sh;
# without one there, shared/peers/install.sh of this checkout (or ../shared/peers) is used.
# Receipts and logs go under $OUT/receipts and $OUT (OUT defaults to .: ./receipts).
# sparse_mla reads SEQS (4096,8192,16384), HEADS (16,32,64,128), REPS (5), REST (1.5 s idle before each row) and
# TIMEOUT (560 s), PROFILE (set: also one profiled step per case, a text file each); indexer reads INDEXER_IMPLS (ours,ours_fp8,mcore_native,mcore_tilelang,cudnn);
# PYTHON picks the interpreter (python3).
set -uo pipefail

usage() {
  sed -n '6,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

peers="" cmd="" bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --peers) peers=${2:?--peers needs a folder}; shift 2 ;;
    --peers=*) peers=${1#--peers=}; shift ;;
    --bundle) bundle=${2:?--bundle needs a folder}; shift 2 ;;
    --bundle=*) bundle=${1#--bundle=}; shift ;;
    -h|--help) usage 0 ;;
    install|indexer|sparse_mla)
      [ -z "$cmd" ] || usage; cmd=$1; shift ;;
    *)
      if [ -z "$peers" ] && [ -z "$cmd" ]; then peers=$1
      elif [ "$cmd" = install ] && [ -z "$bundle" ]; then bundle=$1
      else usage; fi
      shift ;;
  esac
done
[ -n "$peers" ] && [ -n "$cmd" ] || usage
if [ "$cmd" = install ] && [ -z "$bundle" ]; then
  echo "install needs the bundle folder: $0 PEERS_DIR install BUNDLE_DIR" >&2; exit 2
fi
if [ "$cmd" = install ]; then mkdir -p "$peers" || exit 2; fi
[ -d "$peers" ] || { echo "PEERS_DIR $peers is not a folder (run install first)" >&2; exit 2; }
peers=$(cd "$peers" && pwd)

OUT=${OUT:-.}
PY=${PYTHON:-python3}
mkdir -p "$OUT/receipts"
export PYTHONPATH="$peers:$peers/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "$cmd" in
  install)
    inst=""
    for c in "$bundle/install.sh" "$PWD/shared/peers/install.sh" "$PWD/../shared/peers/install.sh"; do
      [ -f "$c" ] && { inst=$c; break; }
    done
    [ -n "$inst" ] || { echo "no install.sh in $bundle, shared/peers or ../shared/peers" >&2; exit 2; }
    bash "$inst" "$bundle" "$peers" | tail -1
    # FlashMLA's sparse forward has no package on the index: the wheel that
    # benchmarks/peers/build_flash_mla.sh builds (FLASHMLA_WHEELS, default .flashmla/*.whl)
    for w in ${FLASHMLA_WHEELS:-.flashmla/*.whl}; do
      [ -f "$w" ] && "$PY" -m pip install -q --no-deps --target "$peers" "$w" && echo "installed $w"
    done ;;
  indexer)
    timeout 560 "$PY" benchmarks/bench_indexer.py --S 4096,8192,16384,32768,65536,131072 \
      --impls "${INDEXER_IMPLS:-ours,ours_fp8,mcore_native,mcore_tilelang,cudnn}" --score-only --breakdown --loss-S 32768 \
      --loss-variants attn,sparse --check 32768 --out "$OUT/receipts" 2>&1 | tee "$OUT/indexer.log" \
      | grep -v "^compile_report" | tail -45 ;;
  sparse_mla)
    # every row starts after the GPU idled REST seconds; rows record the SM clock and power
    timeout "${TIMEOUT:-560}" "$PY" benchmarks/bench_sparse_mla.py --S "${SEQS:-4096,8192,16384}" --H "${HEADS:-16,32,64,128}" \
      --reps "${REPS:-5}" --rest "${REST:-1.5}" --out "$OUT/receipts${PART:+/$PART}" \
      ${PROFILE:+--profile-dir "$OUT/receipts"} 2>&1 \
      | tee "$OUT/sparse_mla${PART:+_$PART}.log" | tail -45 ;;
esac
