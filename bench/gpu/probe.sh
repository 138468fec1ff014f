#!/bin/bash
# Device: `stress probe` against the server started by vllm_up.sh or llama_up.sh; the runs come back as one
# tar under $OUT. KIND=vllm|llamacpp, PHASE=first (prefill and decode probes) | rest (Poisson, held-out)
# | repeat (the held-out rates again with another seed, into runs_<kind>_repeat: more held-out runs, and
# the server's own run-to-run spread). The server's log goes along as server.log. HELDOUT=RATES and
# SETS="--set duration_s=90 ..." change the repeat phase's rates and its runs (longer held-out runs).
#   bash bench/gpu/probe.sh vllm first
#   HELDOUT=0.5,1 SETS="--set duration_s=90" bash bench/gpu/probe.sh llamacpp repeat
KIND=$1 PHASE=$2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ "$KIND" = vllm ]; then
  URL=http://127.0.0.1:8000
  ARGS="--users 1,4,16,64,128,256 --contexts 256,2048 --rates 4,16,32 --heldout-rates ${HELDOUT:-4,12,24,40}"
else
  URL=http://127.0.0.1:8001
  ARGS="--api llamacpp --prompt-word a --users 1,4,8,16 --contexts 256,2048 --rates 1,2,3 --heldout-rates ${HELDOUT:-0.5,1.5,2.5,4}"
fi
curl -sf $URL/health >/dev/null || { echo "server down"; tail -30 /tmp/$KIND.log; exit 1; }
DIR=runs_$KIND EXTRA_SETS=$SETS SETS=""
if [ "$PHASE" = first ]; then ONLY="--only probe_prefill --only probe_decode"
elif [ "$PHASE" = repeat ]; then ONLY="--only heldout" DIR=runs_${KIND}_repeat SETS="--set seed=2 $EXTRA_SETS"
else ONLY="--only probe_poisson --only heldout"; fi
python3 -c "from stress_tester.cli import app; app()" probe --base-url $URL --out /tmp/$DIR $ARGS $ONLY $SETS 2>&1 | tail -40
rc=$?
find /tmp/$DIR \( -name report.md -o -name "*.png" \) -delete
cp /tmp/$KIND.log /tmp/$DIR/server.log 2>/dev/null
tar czf $OUT/${KIND}_$PHASE.tgz -C /tmp $DIR && ls -la $OUT
grep -iE "error|Traceback" /tmp/$KIND.log | tail -5
exit $rc
