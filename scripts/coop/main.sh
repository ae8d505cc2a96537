#!/usr/bin/env bash
# CoOp few-shot training, with the argument order of CoOp's scripts/coop/main.sh:
#   DATA=/path/to/datasets bash scripts/coop/main.sh DATASET CFG CTP NCTX SHOTS CSC
#   e.g. DATA=~/data bash scripts/coop/main.sh oxford_pets rn50_ep50 end 16 16 False
# Runs seeds 1-3 into output/<DATASET>/CoOp/<CFG>_<SHOTS>shots/nctx<NCTX>_csc<CSC>_ctp<CTP>/seed<S>; a finished seed
# is skipped by train.py itself. Extra KEY VALUE opts may follow (e.g. MODEL.BACKBONE.WEIGHTS path/to/RN50.pt).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to the folder that holds the dataset folders (CoOp layout)}"
if [ $# -lt 6 ]; then
  echo "usage: DATA=... $0 DATASET CFG CTP NCTX SHOTS CSC [KEY VALUE ...]" >&2
  exit 2
fi
DATASET=$1 CFG=$2 CTP=$3 NCTX=$4 SHOTS=$5 CSC=$6
shift 6
PY=${PYTHON:-.venv/bin/python}
for SEED in 1 2 3; do
  "$PY" train.py --root "$DATA" --seed "$SEED" --trainer CoOp \
    --dataset-config-file "configs/datasets/${DATASET}.yaml" --config-file "configs/trainers/CoOp/${CFG}.yaml" \
    --output-dir "output/${DATASET}/CoOp/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/seed${SEED}" \
    TRAINER.COOP.N_CTX "$NCTX" TRAINER.COOP.CSC "$CSC" TRAINER.COOP.CLASS_TOKEN_POSITION "$CTP" \
    DATASET.NUM_SHOTS "$SHOTS" "$@"
done
