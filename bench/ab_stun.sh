#!/usr/bin/env bash
# A/B of the strict stun round trip against the spin pingpong and the C floor (issue 7's
# criterion), for any checkouts of asirt, run alternately in one session on the same CPUs:
#   git worktree add /tmp/before <commit>
#   bench/ab_stun.sh -n 5 /tmp/before before . main
# Each round runs every tree once, in the order given; a line per run gives stun and pingpong
# p50 (ns), the C floor's, and their ratios; with more than one run, the medians per label
# follow. The C floor between two vCPUs jumps as the host moves them: compare only medians of
# interleaved rounds, never single runs.
set -euo pipefail
rounds=1
if [[ ${1:-} == -n ]]; then rounds=${2:?-n needs a number}; shift 2; fi
if (( $# < 2 || $# % 2 )); then
    echo "usage: ab_stun.sh [-n ROUNDS] TREE LABEL [TREE LABEL ...]" >&2
    exit 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { PYTHONPATH="$tree" python3 -m asirt "$@" --out "$out" --json --quiet 2>/dev/null; }
one() {
    local stun floor pp
    stun=$(run bench stun --transport spin --protocol strict --duration 2 | python3 -c \
        "import json,sys; print(json.load(sys.stdin)['scenarios'][0]['metrics']['stun_roundtrip']['p50'])")
    read -r floor pp < <(run bench pingpong --transport spin --duration 2 | python3 -c "
import json, sys
d = {s['transport']: s['metrics']['roundtrip']['p50'] for s in json.load(sys.stdin)['scenarios']}
print(d['c-floor'], d['spin'])")
    python3 -c "print('%-8s stun %5d pp %4d floor %4d  stun/pp %.2f stun/floor %.2f pp/floor %.2f'
                 % ('$label', $stun, $pp, $floor, $stun / $pp, $stun / $floor, $pp / $floor))"
}
for ((r = 0; r < rounds; r++)); do
    args=("$@")
    for ((i = 0; i < ${#args[@]}; i += 2)); do
        tree=$(cd "${args[i]}" && pwd)
        label=${args[i + 1]}
        one | tee -a "$out/lines"
    done
done
if (( rounds > 1 || $# > 2 )); then
    python3 - "$out/lines" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    runs[f[0]].append((int(f[2]), int(f[4]), int(f[6])))
print("medians:")
for label, v in runs.items():
    med = lambda xs: statistics.median(xs)
    print("%-8s stun %5d pp %4d floor %4d  stun/pp %.2f stun/floor %.2f  (%d runs)"
          % (label, med(x[0] for x in v), med(x[1] for x in v), med(x[2] for x in v),
             med(x[0] / x[1] for x in v), med(x[0] / x[2] for x in v), len(v)))
EOF
fi
