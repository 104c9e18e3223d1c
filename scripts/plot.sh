#!/usr/bin/env bash
# Plots any set of blpa-train runs from their JSON-lines logs (--log), one PNG per quantity
# against iteration:
#   loss.png         training loss (each record's mean over its --log-every window)
#   error.png        test error from the evaluation records, in %
#   images-per-s.png training throughput
#   memory.png       stored activations (solid) and the step's peak memory (dashed), MiB
#
#   scripts/plot.sh [-o DIR] [-p PREFIX] [-t TITLE] LOG.jsonl...
#
# Each run's legend comes from the configuration record in its log (the last one, for a
# resumed run): the settings that differ between the logs given (mode and bits, seed, depth,
# batch, ...), the mode when none differ, the file name for a log without one. The title
# names the settings they share, the mode among them (or -t TITLE); both are printed. A
# quantity no log has (no evaluation, say) is left out. Needs gnuplot (Debian's gnuplot-nox;
# scripts/setup.sh installs it) and awk.
set -euo pipefail
usage() {  # $1: the exit status (0 for -h, 2 for a bad command line, on stderr)
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&$((1 + ($1 != 0)))
  exit "$1"
}
out=. prefix="" title=""
while getopts "o:p:t:h" opt; do
  case $opt in
    o) out=$OPTARG ;;
    p) prefix=$OPTARG ;;
    t) title=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || usage 2
command -v gnuplot >/dev/null || { echo "plot.sh: gnuplot not found (Debian: gnuplot-nox; scripts/setup.sh installs it)" >&2; exit 1; }
for f in "$@"; do
  [[ -f $f && -r $f ]] || { echo "plot.sh: $f: not a readable file" >&2; exit 1; }
done
# The PNGs' folder (-p may name a subfolder): one that cannot be written made gnuplot send
# the PNG to the terminal.
dest=$(dirname "$out/${prefix}x")
mkdir -p "$dest"
[[ -w $dest ]] || { echo "plot.sh: $dest: not a writable folder" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The settings a legend may name, in the order it names them.
keys=(dataset arch depth mode precision memory_format batch accum_steps lr weight_decay momentum warmup iterations seed
  world device train_subset)
# Per log: the last config record's settings (a resumed run appends one: its --iterations may
# have grown), one "key<TAB>value" per line, in $tmp/N.cfg; its
# training records as "iter loss images_per_s stored_MiB peak_MiB" in $tmp/N.train and its
# evaluation records as "iter error_%" in $tmp/N.eval.
n=0
for f in "$@"; do
  n=$((n + 1))
  awk -v cfg="$tmp/$n.cfg" -v train="$tmp/$n.train" -v ev="$tmp/$n.eval" -v keys="${keys[*]}" '
    # The value of "key": in s (a string without its quotes, a number or a boolean).
    function get(s, key,    v) {
      if (!match(s, "\"" key "\": (\"[^\"]*\"|[^,}]*)")) return ""
      v = substr(s, RSTART + length(key) + 4, RLENGTH - length(key) - 4)
      gsub(/"/, "", v)
      return v
    }
    # Only whole records: a run killed while writing leaves its last one cut short, whose
    # missing figures read as 0 (a point at 100% error); a null accuracy (a test loss that
    # overflowed) has no error to plot.
    !/}[ \t\r]*$/ { next }
    /"type": "config"/ {
      c = substr($0, index($0, "\"config\": {") + 10)
      nk = split(keys, k, " ")
      for (i = 1; i <= nk; i++) setting[i] = get(c, k[i])
    }
    /"type": "train"/ {
      print get($0, "iter"), get($0, "loss"), get($0, "images_per_s"), get($0, "stored_activation_bytes") / 1048576,
            get($0, "peak_bytes") / 1048576 > train
    }
    /"type": "eval"/ && get($0, "test_acc") != "null" { print get($0, "iter"), 100 * (1 - get($0, "test_acc")) > ev }
    END { for (i = 1; i <= nk; i++) print k[i] "\t" setting[i] > cfg }
  ' "$f"
  touch "$tmp/$n.cfg" "$tmp/$n.train" "$tmp/$n.eval"
done

value() { awk -F'\t' -v k="$2" '$1 == k { print $2 }' "$tmp/$1.cfg"; }
# Settings on which the logs with a config record agree go to the title, the others to the
# legends.
varying=() shared=()
for k in "${keys[@]}"; do
  vals=$(for i in $(seq "$n"); do [[ ! -s $tmp/$i.cfg ]] || value "$i" "$k"; done | sort -u | wc -l)
  if ((vals > 1)); then varying+=("$k"); else shared+=("$k"); fi
done
describe() {  # $1: log number, $2...: keys
  local i=$1 s="" v
  shift
  for k in "$@"; do
    v=$(value "$i" "$k")
    case $k in
      mode | dataset) s+=" $v" ;;
      arch) s+=" $v-$(value "$i" depth)" ;;
      depth) [[ " $* " == *" arch "* ]] || s+=" depth $v" ;;
      *) s+=" ${k//_/ } $v" ;;
    esac
  done
  echo "${s# }"
}
labels=()
for i in $(seq "$n"); do
  f=${!i}
  if [[ ! -s $tmp/$i.cfg ]]; then
    labels+=("$(basename "$f" .jsonl)")
  elif ((${#varying[@]})); then
    labels+=("$(describe "$i" "${varying[@]}")")
  else
    labels+=("$(describe "$i" mode)")
  fi
done
# Two runs with the same legend: the file names tell them apart.
if (($(printf '%s\n' "${labels[@]}" | sort | uniq -d | wc -l))); then
  for i in $(seq "$n"); do
    f=${!i}
    labels[i - 1]+=" ($(basename "$f" .jsonl))"
  done
fi
all_configured=1
for i in $(seq "$n"); do [[ -s $tmp/$i.cfg ]] || all_configured=0; done
is_shared() { [[ " ${shared[*]} " == *" $1 "* ]]; }
if [[ -z $title && $all_configured == 1 ]]; then
  first=1
  parts=()
  if is_shared dataset; then parts+=("$(value "$first" dataset)"); fi
  if is_shared arch && is_shared depth; then parts+=("$(value "$first" arch)-$(value "$first" depth)"); fi
  # The mode, where the legends do not name it (they do when nothing differs).
  if is_shared mode && ((${#varying[@]})); then parts+=("$(value "$first" mode)"); fi
  if is_shared batch; then parts+=("batch $(value "$first" batch)"); fi
  title=$(printf '%s, ' "${parts[@]}")
  title=${title%, }
fi
[[ -z $title ]] || echo "title: $title"
for i in $(seq "$n"); do echo "${labels[i - 1]}: ${!i}"; done

# One gnuplot run per quantity; $1 file name, $2 y label, $3 data suffix, $4 plot clause per
# log (with @F for its data file, @T for its title, @I for its number and @S for its style:
# lines, with points where they are few), $5 more gnuplot settings.
plot() {
  local png=$out/$prefix$1 clauses="" i
  for i in $(seq "$n"); do
    [[ -s $tmp/$i.$3 ]] || continue
    local t=${labels[i - 1]//\'/\'\'} c=$4 style="lines"
    (($(wc -l <"$tmp/$i.$3") > 40)) || style="linespoints pt 7 ps 0.6"
    c=${c//@S/$style}
    c=${c//@F/$tmp/$i.$3}
    c=${c//@T/$t}
    clauses+="${c//@I/$i}, "
  done
  if [[ -z $clauses ]]; then
    # A plot from an earlier set of logs would stay beside these ones' as if it were theirs.
    if [[ -e $png ]]; then rm -f "$png"; echo "$png: no log has $2 records; not written (the older one removed)"
    else echo "$png: no log has $2 records; not written"; fi
    return
  fi
  # Single-quoted gnuplot strings ('' for a quote): in double quotes gnuplot runs `commands`,
  # which a title or a path could hold.
  local q="'" qq="''"
  gnuplot <<GP
set terminal pngcairo size 900,560 font "Sans,11" noenhanced
set output '${png//$q/$qq}'
set title '${title//$q/$qq}${title:+: }$2'
set xlabel "iteration"; set ylabel "$2"; set grid; set key outside right top
${5:-}
plot ${clauses%, }
GP
  [[ -s $png ]] || { echo "plot.sh: $png: not written" >&2; exit 1; }
  written=$((written + 1))
  echo "$png"
}
written=0
plot loss.png "training loss" train "'@F' using 1:2 with @S lw 2 lc @I title '@T'" "set logscale y"
plot error.png "test error (%)" eval "'@F' using 1:2 with @S lw 2 lc @I title '@T'"
plot images-per-s.png "images/s" train "'@F' using 1:3 with @S lw 2 lc @I title '@T'" "set yrange [0:*]"
plot memory.png "MiB: stored activations (solid), step peak (dashed)" train \
  "'@F' using 1:4 with @S lw 2 lc @I title '@T', '@F' using 1:5 with @S lw 2 dt 2 lc @I notitle" "set yrange [0:*]"
((written > 0)) || { echo "plot.sh: the logs have no records to plot; nothing written" >&2; exit 1; }
