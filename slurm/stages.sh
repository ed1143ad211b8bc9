# Shared by the staged pipelines: slurm/efficient_staged.sh, slurm/growclip_demo.sh and
# scripts/efficient_staged.sh (the local form). Sourced, not run. The caller sets NAME (for
# messages) and USAGE, then calls parse_args, read_steps, and efficient_stages where it trains
# the all-four stages, so the local and the SLURM pipelines cannot drift apart.

die() { echo "$NAME: error: $*" >&2; exit 2; }

parse_args() {  # [--slurm] [--extra] -- ARGS... -> dry, opts (for pipeline.sh), extra (key=value)
    local slurm=0 keys=0
    while [ $# -gt 0 ]; do
        case "$1" in --slurm) slurm=1; shift ;; --extra) keys=1; shift ;; --) shift; break ;; *) break ;; esac
    done
    dry=0 opts=() extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --dry-run) dry=1; opts+=("$1"); shift ;;
            --after) [ "$slurm" = 1 ] || die "unknown argument '$1' (usage: $USAGE)"
                     [ $# -ge 2 ] || die "--after needs a job id"; opts+=("$1" "$2"); shift 2 ;;
            --after=*) [ "$slurm" = 1 ] || die "unknown argument '$1' (usage: $USAGE)"; opts+=("$1"); shift ;;
            -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
            *=*) [ "$keys" = 1 ] || die "unknown argument '$1' (usage: $USAGE)"; extra+=("$1"); shift ;;
            *) die "unknown argument '$1' (usage: $USAGE)" ;;
        esac
    done
}

read_steps() {  # default -> STEPS, the max_steps of the three training stages
    read -r -a STEPS <<< "${STEPS:-$1}"
    [ ${#STEPS[@]} -eq 3 ] || die "STEPS must be three numbers (one per training stage), got '${STEPS[*]}'"
    local s
    for s in "${STEPS[@]}"; do
        case "$s" in ''|*[!0-9]*|0) die "STEPS must be positive integers, got '${STEPS[*]}'" ;; esac
    done
}

no_demo_data() {
    die "no demo data in $DATA: run \`python -m trainer make-demo-data --out $DATA\` first (or set DEMO_DATA)"
}

efficient_stages() {  # DATA, STEPS -> the all-four stages' key=value arrays
    # stage 1 trains 2+2 layers of width 64; grow deeper to 4+4, then wider to 128
    small=(model.vision_layers=2 model.text_layers=2 model.vision_width=64 model.vision_heads=2
           model.text_width=64 model.text_heads=2)
    deeper=(model.vision_layers=4 model.text_layers=4)
    wider=(model.vision_width=128 model.vision_heads=4 model.text_width=128 model.text_heads=4)
    data=(data.train_shards="$DATA/train" data.val_shards="$DATA/val" tokenizer.path="$DATA/tokenizer"
          eval.zeroshot="$DATA/zeroshot.json" text_lm.shards="$DATA/text")
    # one ECL round halfway through each of the first two stages (keep 0.85 each: 72 % of the pairs
    # after both), the methods' schedules over all three stages
    first=(select.keep=0.85 select.max_rounds=2 growth.schedule_steps=$(( STEPS[0] + STEPS[1] + STEPS[2] )))
    local k
    for k in 1 2 3; do
        eval "stage$k=(max_steps=${STEPS[k - 1]} select.every_steps=$(( (STEPS[k - 1] + 1) / 2 )))"
    done
}
