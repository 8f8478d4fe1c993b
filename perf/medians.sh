# Sourced by the perf scripts that compare builds or setups over several runs.
#
# medians LABEL FIGURES REPORT...: one line, "LABEL (N lost): FIGURE MEDIAN UNIT (MIN..MAX, K
# runs); …", for each figure (FIGURES separated by ";") that the shardcast-bench reports have
# (their lines are "  name  value unit").
medians() {
  local label=$1 figures=$2
  shift 2
  local lost line figure values n median list
  lost=$(cat "$@" | awk '$1 == "lost" {s += $2} END {print s + 0}')
  line="$label ($lost lost):"
  IFS=';' read -r -a list <<<"$figures"
  for figure in "${list[@]}"; do
    values=$(cat "$@" | awk -F '  +' -v f="$figure" '$2 == f {split($3, v, " "); print v[1], v[2]}' | sort -g)
    [ -n "$values" ] || continue
    n=$(echo "$values" | grep -c .)
    median=$(echo "$values" | awk -v n="$n" 'NR == int((n + 1) / 2) {print}')
    line+=" $figure $median ($(echo "$values" | head -1 | cut -d' ' -f1)..$(echo "$values" | tail -1 | cut -d' ' -f1), $n runs);"
  done
  echo "$line"
}
