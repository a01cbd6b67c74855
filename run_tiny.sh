#!/usr/bin/env bash
# The Command A pipeline of the report's Figure 3 at tiny scale, on a CPU, in one command:
#
#   data -> tokenizer -> pretrain (cooldown + context extension) -> instruct (SFT, then SRPO) -> six SFT
#   experts (code and multilingual merged over 2 seeds) -> SFT soup (a weight search over the experts'
#   task-arithmetic scales from the instruct model, then low-LR SFT on every capability's data, §4.9.2) -> RL
#   experts with each domain's method -> RL soup (the same two steps, from the SFT soup) -> polishing
#   (best-of-N SFT, then SRPO <-> online CoPG ping-pong) -> RUNS/report.md, one row per checkpoint, and
#   RUNS/times.txt, the wall time of every stage.
#
#     bash run_tiny.sh                 # data/tiny, runs/tiny
#     QUICK=1 bash run_tiny.sh         # a few steps per stage: checks that the chain runs (tests do this)
#     SEED=1 bash run_tiny.sh          # another world: data/tiny-seed1, runs/tiny-seed1
#     DATA=data/x RUNS=runs/x bash run_tiny.sh
#
# Every stage resumes from its --out (a weight search replays its search.jsonl), so a stopped run continues
# where it was.
set -euo pipefail
cd "$(dirname "$0")"
SEED=${SEED:-0}  # the world's seed; the default folders name any other, so that no stage resumes another world's
SUFFIX=$([ "$SEED" = 0 ] || echo "-seed$SEED")
DATA=${DATA:-data/tiny$SUFFIX}
RUNS=${RUNS:-runs/tiny$SUFFIX}
CHECKPOINTS=(pretrain instruct sft-rag sft-multilingual sft-code sft-math sft-longctx sft-safety sft-merge \
             sft-soup rl-safety rl-multilingual rl-code rl-math rl-rag rl-instruct rl-longctx rl-merge rl-soup \
             polish-bon polished)
# Training matmuls in bf16 (autocast, fp32 weights: §2.4.1) on a CPU that multiplies bf16 natively, 1.2-1.4x a
# training step there; elsewhere fp32 (on a GPU, bf16 all the same). PRECISION=fp32 turns it off.
PRECISION=${PRECISION:-$(python -c "import distributed as d; print('bf16' if d.cpu_has_native_bf16() else 'auto')")}
TRAIN=(--precision "$PRECISION")
if [ "${QUICK:-0}" = 1 ]; then
    PRETRAIN=(--steps 6 --warmup 2 --eval-every 3 --eval-batches 1 --context-schedule 256:2,512:2)
    STEPS=(--steps 2 --no-eval "${TRAIN[@]}")
    REWARD=(--stage1-epochs 0.02 --stage2-epochs 0.03)
    BEST_OF_N=(--best-of-n-prompts 8)
    CODE_STAGE2=(--best-of-n-prompts 8)
    POLISH=(--rounds 2 --prompts 14 --samples 2 --srpo-steps 2 --copg-steps 2)
    SFT_SEARCH=(--budget 2 --limit 2)
    RL_SEARCH=(--budget 2 --limit 2)
    EVAL=(--limit 2)
    CHECKPOINTS=(instruct sft-merge sft-soup rl-soup polished)
else
    PRETRAIN=(--steps 1500 --eval-every 500 --context-schedule 256:150,1024:100,2048:50)
    STEPS=(--no-eval "${TRAIN[@]}")   # each stage's own evaluation: the table at the end holds them all
    REWARD=()
    BEST_OF_N=(--best-of-n-prompts 192)
    CODE_STAGE2=(--best-of-n-prompts 64)
    POLISH=()
    # 12 candidates for the SFT soup: the experts' changes collide, and the search reaches math's share in its
    # 9th (math's gain kept 47 % and 53 % after 8, 84 % and 94 % after 12; RESULTS.md); 8 for the RL soup
    SFT_SEARCH=(--budget 12)
    RL_SEARCH=(--budget 8)
    EVAL=()
fi
mkdir -p "$RUNS"
: > "$RUNS/times.txt"
stage() {
    echo; echo "=== $*"
    local start=$SECONDS
    "$@"
    printf '%5d s  %s\n' $((SECONDS - start)) "${*:2}" >> "$RUNS/times.txt"
}
# Stages that do not depend on each other run as lanes: `lane python ...` starts one in the background (at most
# LANES at once, the cores shared out among them; its output goes to RUNS/logs/) and `join` waits for them all.
# The tiny model's matmuls are too small to keep two threads busy, so on 2 cores two one-thread runs side by side
# finish sooner than the same two runs one after the other on two threads (1.25x for two SFT stages:
# RESULTS.md). A failing lane stops the run, and the other lanes with it.
LANES=${LANES:-2}
LANE_THREADS=$(( $(nproc) / LANES > 1 ? $(nproc) / LANES : 1 ))
LANE_PIDS=()
LANES_START=
mkdir -p "$RUNS/logs"
lane() {
    while [ "${#LANE_PIDS[@]}" -ge "$LANES" ]; do reap; done
    LANES_START=${LANES_START:-$SECONDS}
    local log="$RUNS/logs/$(lane_name "$@").log"
    echo; echo "=== $* (in the background, output in $log)"
    OMP_NUM_THREADS=$LANE_THREADS stage "$@" > "$log" 2>&1 &
    LANE_PIDS+=($!)
}
lane_name() {  # the --out folder's name, else the script's with the lane's number
    local previous=
    for word in "$@"; do [ "$previous" = --out ] && basename "$word" && return; previous=$word; done
    echo "$(basename "$2" .py)-${#LANE_PIDS[@]}"
}
reap() {  # waits for one lane to end
    local pid status=0 pids=()
    wait -n -p pid "${LANE_PIDS[@]}" || status=$?
    for other in "${LANE_PIDS[@]}"; do [ "$other" = "$pid" ] || pids+=("$other"); done
    LANE_PIDS=("${pids[@]}")
    if [ "$status" != 0 ]; then echo "a lane failed (exit $status); its log is in $RUNS/logs/"; exit "$status"; fi
}
join() {
    while [ "${#LANE_PIDS[@]}" -gt 0 ]; do reap; done
    printf '%5d s  = the lanes above, side by side\n' $((SECONDS - LANES_START)) >> "$RUNS/times.txt"
    LANES_START=
}
stop_lanes() { for pid in "${LANE_PIDS[@]}"; do pkill -P "$pid"; kill "$pid"; done 2>/dev/null || true; }
trap stop_lanes EXIT

stage python tasks.py --out "$DATA" --seed "$SEED"
stage python data.py tokenizer --data "$DATA"
stage python data.py shards --data "$DATA"
stage python pretrain.py --data "$DATA" --out "$RUNS/pretrain" "${PRETRAIN[@]}" "${TRAIN[@]}"

# instruct model: SFT from the base model, then SRPO (§3.1); the reward model trains from the same SFT model
stage python sft.py --capability instruct --data "$DATA" --init "$RUNS/pretrain" --out "$RUNS/instruct-sft" "${STEPS[@]}"
lane python reward.py --data "$DATA" --init "$RUNS/instruct-sft" --out "$RUNS/reward" "${REWARD[@]}" "${TRAIN[@]}"
lane python prefopt.py --capability instruct --data "$DATA" --init "$RUNS/instruct-sft" --out "$RUNS/instruct" "${STEPS[@]}"
join

# SFT experts from the instruct model (§3.3); code and multilingual over two seeds, merged (seed merging: §3.3.4.2,
# B.2)
# (the longest first, so that the lanes end together)
for cap in math longctx rag safety; do
    lane python sft.py --capability "$cap" --data "$DATA" --init "$RUNS/instruct" --out "$RUNS/sft-$cap" "${STEPS[@]}"
done
for cap in code multilingual; do
    for seed in 0 1; do   # half the recipe's steps each: the merge of two seeds costs one run
        lane python sft.py --capability "$cap" --data "$DATA" --init "$RUNS/instruct" --out "$RUNS/sft-$cap-seed$seed" \
            --seed "$seed" --steps 100 "${STEPS[@]}"
    done
done
join
stage python merge.py --out "$RUNS/sft-multilingual" --models "$RUNS"/sft-multilingual-seed{0,1}
stage python merge.py --out "$RUNS/sft-code-stage1" --models "$RUNS"/sft-code-seed{0,1}
# code stage 2 (§3.3.4.2): SFT on high-quality data, the stage-1 merge's samples that pass their tests (with
# stage 1's share of other capabilities' data), over two seeds, merged again
for seed in 0 1; do
    lane python sft.py --capability code --data "$DATA" --init "$RUNS/sft-code-stage1" \
        --out "$RUNS/sft-code-stage2-seed$seed" --seed "$seed" --best-of-n 4 --verified "${CODE_STAGE2[@]}" \
        "${STEPS[@]}"
done
join
stage python merge.py --out "$RUNS/sft-code" --models "$RUNS"/sft-code-stage2-seed{0,1}
SFT_EXPERTS=("$RUNS"/sft-{rag,multilingual,code,math,longctx,safety})
stage python merge.py --search --data "$DATA" --out "$RUNS/sft-merge" --base "$RUNS/instruct" --models "${SFT_EXPERTS[@]}" \
    "${SFT_SEARCH[@]}"
stage python sft.py --capability all --data "$DATA" --init "$RUNS/sft-merge" --out "$RUNS/sft-soup" "${STEPS[@]}"

# RL experts from the SFT soup, each with its domain's method (§3.3), the longest first. Long context has no RL
# recipe: more long-context SFT, with every other capability's conversations in half of each batch (needles
# only, it fell to a capability mean of 0.19 and collided with every other expert in the RL soup: RESULTS.md)
lane python copg.py --capability math --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-math" "${STEPS[@]}"
lane python sft.py --capability longctx --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-longctx" --steps 100 \
    --cross-domain 1.0 "${STEPS[@]}"
lane python prefopt.py --capability instruct --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-instruct" "${STEPS[@]}"
lane python copg.py --capability rag --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-rag" "${STEPS[@]}"
lane python copg.py --capability code --mode offline --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-code-copg" "${STEPS[@]}"
lane python prefopt.py --capability safety --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-safety" "${STEPS[@]}"
lane python prefopt.py --capability multilingual --data "$DATA" --init "$RUNS/sft-soup" --out "$RUNS/rl-multilingual" "${STEPS[@]}"
join
stage python merge.py --out "$RUNS/rl-code" --models "$RUNS/rl-code-copg" "$RUNS/sft-soup" --weights 0.7 0.3  # back toward the parent
RL_EXPERTS=("$RUNS"/rl-{safety,multilingual,code,math,rag,instruct,longctx})
stage python merge.py --search --data "$DATA" --out "$RUNS/rl-merge" --base "$RUNS/sft-soup" --models "${RL_EXPERTS[@]}" \
    "${RL_SEARCH[@]}"
stage python sft.py --capability all --data "$DATA" --init "$RUNS/rl-merge" --out "$RUNS/rl-soup" "${STEPS[@]}"

# polishing (§3.5): best-of-N SFT ranked by the reward model (prompts from every capability), then ping-pong:
# SRPO on pairs of the model's own samples <-> online CoPG with the reward model, ending on SRPO, while the gold
# win rate rises (RUNS/polished/phases.md: the table of every phase)
stage python sft.py --capability instruct --data "$DATA" --init "$RUNS/rl-soup" --out "$RUNS/polish-bon" \
    --best-of-n 4 --reward-model "$RUNS/reward" --cross-domain 1.0 "${BEST_OF_N[@]}" "${STEPS[@]}"
stage python polish.py --data "$DATA" --init "$RUNS/polish-bon" --out "$RUNS/polished" --reward-model "$RUNS/reward" \
    --reference "$RUNS/instruct" "${POLISH[@]}" "${TRAIN[@]}"

# the report: every capability of every checkpoint, the reward model's win rate against the instruct model
# (in two lanes: every other checkpoint each)
for first in 0 1; do
    half=(); for ((i = first; i < ${#CHECKPOINTS[@]}; i += 2)); do half+=("$RUNS/${CHECKPOINTS[i]}"); done
    lane python evaluate.py --model "${half[@]}" --data "$DATA" --reward-model "$RUNS/reward" \
        --reference "$RUNS/instruct" "${EVAL[@]}"
done
join
stage python evaluate.py --report "${CHECKPOINTS[@]/#/$RUNS/}" --out "$RUNS/report.md"
echo; echo "polishing, phase by phase (on RL prompts; $RUNS/polished/phases.md):"
cat "$RUNS/polished/phases.md"
echo; echo "wall time per stage ($RUNS/times.txt), $((SECONDS / 60)) min $((SECONDS % 60)) s in all:"
cat "$RUNS/times.txt"
