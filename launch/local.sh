#!/bin/bash
# =====================================================================================================
# MAE pre-training on one machine with N GPUs (or CPU ranks), with automatic resume:
#
#   bash launch/local.sh                                   # all GPUs, configs/vit_b.yaml
#   NGPUS=4 CONFIG=configs/demo.yaml bash launch/local.sh train.epochs=2
#   TRAIN_SCRIPT=finetune.py CONFIG=configs/finetune_vit_b.yaml bash launch/local.sh
#
# Runs   deepspeed [--num_gpus NGPUS] --master_port PORT TRAIN_SCRIPT --config CONFIG --resume auto
#        output_dir=OUTPUT_DIR [overrides...]
# and starts it again while it exits with status 75 ("pre-empted, checkpoint saved": e.g. after a
# SIGTERM/SIGUSR1 sent to the ranks), so it resumes from the checkpoint in OUTPUT_DIR. 0 = finished.
# Ctrl-C / SIGTERM to this script stops the loop (the ranks checkpoint and exit 75; no relaunch).
#
#   NGPUS         ranks (GPUs) to use: a number or "all"   (default all; on a CPU-only machine set it)
#   CONFIG        config file                              (default configs/vit_b.yaml)
#   OUTPUT_DIR    run directory                            (default runs/<config name>)
#   TRAIN_SCRIPT  default pretrain.py;   PYTHON: unused by deepspeed (it uses its own interpreter)
#   MASTER_PORT   default 29500 + a number from OUTPUT_DIR, so two runs on one machine do not collide
#   MAX_RESTARTS  default 20;   EXTRA: more key=value overrides (word-split)
#   DEEPSPEED     launcher command (default deepspeed)
# =====================================================================================================
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

: "${CONFIG:=configs/vit_b.yaml}"
: "${OUTPUT_DIR:=runs/$(basename "${CONFIG%.*}")}"
: "${TRAIN_SCRIPT:=pretrain.py}"
: "${NGPUS:=all}"
: "${MAX_RESTARTS:=20}"
: "${DEEPSPEED:=deepspeed}"
: "${MASTER_PORT:=$((29500 + $(printf '%s' "$OUTPUT_DIR" | cksum | cut -d' ' -f1) % 1000))}"
PREEMPTED=75
# shellcheck disable=SC2206
OVERRIDES=("$@" ${EXTRA:-})

ds_args=(--master_port "$MASTER_PORT")
[ "$NGPUS" != all ] && ds_args=(--num_gpus "$NGPUS" "${ds_args[@]}")

# Job control: the launcher and its ranks get a process group of their own, so a stop signal can be
# passed to all of them (the deepspeed runner itself does not forward SIGTERM).
set -m
stop=0
child=
on_stop() {
    stop=1
    echo "[local.sh] got a stop signal: the ranks checkpoint and exit; not relaunching" >&2
    [ -n "$child" ] && kill -TERM -- "-$child" 2>/dev/null
}
trap on_stop INT TERM

restart=0
while :; do
    echo "[local.sh] $(date '+%F %T') restart $restart: $DEEPSPEED ${ds_args[*]} $TRAIN_SCRIPT --config $CONFIG --resume auto output_dir=$OUTPUT_DIR ${OVERRIDES[*]}"
    # shellcheck disable=SC2086
    $DEEPSPEED "${ds_args[@]}" "$TRAIN_SCRIPT" --config "$CONFIG" --resume auto "output_dir=$OUTPUT_DIR" \
        "${OVERRIDES[@]}" &
    child=$!
    wait "$child"; rc=$?
    while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done  # wait interrupted by a trap
    child=
    if [ "$rc" -eq 0 ]; then echo "[local.sh] finished"; exit 0; fi
    if [ "$rc" -ne "$PREEMPTED" ]; then echo "[local.sh] failed with status $rc"; exit "$rc"; fi
    if [ "$stop" -eq 1 ]; then echo "[local.sh] stopped with a checkpoint in $OUTPUT_DIR (rerun to resume)"; exit "$PREEMPTED"; fi
    restart=$((restart + 1))
    if [ "$restart" -gt "$MAX_RESTARTS" ]; then echo "[local.sh] status 75 $MAX_RESTARTS times in a row: giving up"; exit "$PREEMPTED"; fi
    echo "[local.sh] pre-empted with a checkpoint (status 75): resuming"
done
