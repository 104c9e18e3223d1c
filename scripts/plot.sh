#!/usr/bin/env bash
# Renders the plots of docs/results.md from the JSON-lines files that scripts/study.sh
# writes:   scripts/plot.sh [DIR]   (default results/study) -> docs/*.png
# Uses gnuplot (Debian's gnuplot-nox, installed here if missing) and awk; no Python.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$here/results/study}
docs=$here/docs
if ! command -v gnuplot >/dev/null; then
  sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# field NAME of a JSON line (numbers and strings without commas)
json_col() { awk -v k="\"$1\": " '{ i = index($0, k); if (!i) next; s = substr($0, i + length(k)); sub(/[,}].*/, "", s); gsub(/"/, "", s); print s }'; }

modes=(plain exact blpa-8 blpa-4 naive-4)
plot_train="" plot_eval=""
for m in "${modes[@]}"; do
  f=$dir/fashion-$m.jsonl
  [[ -f $f ]] || continue
  grep '"type": "train"' "$f" | paste <(json_col iter <<<"$(grep '"type": "train"' "$f")") \
    <(json_col loss <<<"$(grep '"type": "train"' "$f")") >"$tmp/$m.train"
  paste <(json_col iter <<<"$(grep '"type": "eval"' "$f")") <(json_col test_acc <<<"$(grep '"type": "eval"' "$f")") >"$tmp/$m.eval"
  plot_train+="'$tmp/$m.train' using 1:2 with lines lw 2 title '$m', "
  plot_eval+="'$tmp/$m.eval' using 1:(100*(1-\$2)) with linespoints lw 2 pt 7 title '$m', "
done
if [[ -n $plot_train ]]; then
  gnuplot <<GP
set terminal pngcairo size 900,560 font "Sans,11"
set output "$docs/study-loss.png"
set title "Fashion-MNIST, ResNet-20, batch 64: training loss (mean over 20 iterations)"
set xlabel "iteration"; set ylabel "loss"; set logscale y; set grid
plot ${plot_train%, }
set output "$docs/study-error.png"
unset logscale y
set title "Fashion-MNIST, ResNet-20: test error (10,000 images)"
set ylabel "test error (%)"; set yrange [*:*]
plot ${plot_eval%, }
GP
fi
mem=$dir/memory-resnet164.jsonl
if [[ -f $mem ]]; then
  paste <(json_col mode <"$mem") <(json_col bits <"$mem") <(json_col stored_activation_bytes <"$mem") \
    <(json_col peak_bytes <"$mem") | awk '{ name = ($2 == 32) ? $1 : $1 "-" $2; print name, $3 / 1048576, $4 / 1048576 }' >"$tmp/mem"
  gnuplot <<GP
set terminal pngcairo size 900,520 font "Sans,11"
set output "$docs/memory-resnet164.png"
set title "ResNet-164, batch 128, one training step (CPU allocator)"
set style data histograms; set style histogram clustered gap 1; set style fill solid 0.8 border -1
set ylabel "MiB"; set grid ytics; set key top right
set yrange [0:*]
plot "$tmp/mem" using 2:xtic(1) title "kept by autograd for backward", "" using 3 title "step peak above resident"
GP
fi
ls "$docs"/*.png
