#!/usr/bin/env bash
# The README's pictures and summary excerpt, copied from a finished tiny run (never edited by hand):
#
#   bash assets/make.sh            # runs `bash train.sh tiny` first; it skips the stages runs/tiny already has
#
# RUN_DIR picks another tiny run directory (default runs/tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN_DIR:-runs/tiny}
RUN_DIR=$RUN bash train.sh tiny
for f in plots/training.png eval/niah/heatmap.png summary.md; do
  [ -f "$RUN/$f" ] || { echo "assets/make.sh: $RUN/$f is missing after the run" >&2; exit 1; }
done
cp "$RUN/plots/training.png" assets/training.png.tmp && mv assets/training.png.tmp assets/training.png
cp "$RUN/eval/niah/heatmap.png" assets/heatmap.png.tmp && mv assets/heatmap.png.tmp assets/heatmap.png
# the summary's links point into the run directory: make them point at these copies
sed -e 's#(plots/training.png)#(training.png)#' -e 's#(eval/niah/heatmap.png)#(heatmap.png)#' "$RUN/summary.md" \
  > assets/summary.md.tmp && mv assets/summary.md.tmp assets/summary.md
echo "assets/make.sh: training.png, heatmap.png and summary.md copied from $RUN"
