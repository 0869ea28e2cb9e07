#!/bin/sh
# The PKU-SafeRLHF experiment of the CAGE paper: one sweep per method over the same preference vectors, then one
# report (HV, MIP, Pareto plot) over all of them. Run from the repository root:
#
#   examples/paper/run.sh                          # the real models (see examples/paper/README.md)
#   examples/paper/run.sh examples/paper/tiny OUT  # the tiny test fixtures, in seconds (what CI runs)
#
# CAGE (the binary), PROMPTS (a JSONL prompt file) and WEIGHTS (the --weights-list) override the defaults.
set -eu
CONFIGS=${1:-examples/paper/pku}
OUT=${2:-paper-out}
CAGE=${CAGE:-cage}
PROMPTS=${PROMPTS:-$CONFIGS/prompts.jsonl}
# (helpful, harmless) from (0, 1) to (1, 0) in steps of 0.1.
WEIGHTS=${WEIGHTS:-"0,1;0.1,0.9;0.2,0.8;0.3,0.7;0.4,0.6;0.5,0.5;0.6,0.4;0.7,0.3;0.8,0.2;0.9,0.1;1,0"}
METHODS="base genarm mod cage cage-paper"
for m in $METHODS; do
    "$CAGE" sweep -c "$CONFIGS/$m.json" --prompts "$PROMPTS" --weights-list "$WEIGHTS" --out "$OUT/$m"
done
# shellcheck disable=SC2046 # one run folder per method
"$CAGE" report $(for m in $METHODS; do echo "$OUT/$m"; done) --out "$OUT/report"
