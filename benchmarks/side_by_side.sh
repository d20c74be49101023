#!/usr/bin/env bash
# Side-by-side receipts on the device box, peers installed from ../shared/peers bundles.
# Usage (device, after the bundles were copied into /root/parts by earlier calls):
#   bash benchmarks/side_by_side.sh install|indexer|sparse_mla   (writes under $OUT/receipts)
set -uo pipefail
export PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/python_packages:$PWD
mkdir -p "$OUT/receipts"
case "${1:?install|indexer|sparse_mla}" in
  install) bash /root/parts/install.sh /root/parts /root/site | tail -1 ;;
  indexer)
    timeout 560 python3 benchmarks/bench_indexer.py --S 4096,8192,16384,32768,65536,131072 \
      --impls ours,mcore_native,mcore_tilelang,cudnn --score-only --loss-S 32768 \
      --loss-variants attn,sparse --check 32768 --out "$OUT/receipts" 2>&1 | tee "$OUT/indexer.log" \
      | grep -v "^compile_report" | tail -45 ;;
  sparse_mla)
    # every row starts after the GPU idled REST seconds; rows record the SM clock and power
    timeout "${TIMEOUT:-560}" python3 benchmarks/bench_sparse_mla.py --S "${SEQS:-4096,8192,16384}" --H 16,64,128 \
      --reps "${REPS:-5}" --rest "${REST:-1.5}" --out "$OUT/receipts" --profile-dir "$OUT/receipts" 2>&1 \
      | tee "$OUT/sparse_mla.log" | tail -45 ;;
esac
