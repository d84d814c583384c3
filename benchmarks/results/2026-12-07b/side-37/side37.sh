#!/bin/bash
# issue 37 side by side: before (1462c60) and after (main) with the same benchmark code
out=$out; mkdir -p $out
run() { # tree name only...
  local tree=$1 tag=$2; shift 2
  cd /work/wt-$tree && echo "[$(date +%T)] $tree $tag start" >> $out/log
  nice -n -10 .venv/bin/python benchmarks/run_all.py --repeats 1 --only "$@" > $out/$tag-$tree.out 2>&1
  cp benchmarks/results/all-*.json $out/ 2>/dev/null
  for f in benchmarks/results/*.json; do cp $f $out/$tag-$tree-$(basename $f); done
  echo "[$(date +%T)] $tree $tag end rc=$?" >> $out/log
}
run before chat1 chat_batch
run after chat1 chat_batch
run before chat2 chat_batch
run after chat2 chat_batch
run before dag dag_scale
run after dag dag_scale
run before fields batch_fields
run after fields batch_fields
echo done >> $out/log
