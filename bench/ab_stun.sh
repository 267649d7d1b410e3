#!/usr/bin/env bash
# A/B of the strict stun round trip against the spin pingpong and the C floor (issue 7's
# criterion), for any checkout of asirt: run it alternately on two trees in one session.
#   git worktree add /tmp/before <commit>
#   for i in 1 2 3; do bench/ab_stun.sh /tmp/before before; bench/ab_stun.sh . main; done
# Prints stun and pingpong p50 (ns), the C floor's, and their ratios.
set -euo pipefail
tree=$(cd "${1:?usage: ab_stun.sh TREE LABEL}" && pwd)
label=${2:-$tree}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { PYTHONPATH="$tree" python3 -m asirt "$@" --out "$out" --json --quiet 2>/dev/null; }
stun=$(run bench stun --transport spin --protocol strict --duration 2 | python3 -c \
    "import json,sys; print(json.load(sys.stdin)['scenarios'][0]['metrics']['stun_roundtrip']['p50'])")
read -r floor pp < <(run bench pingpong --transport spin --duration 2 | python3 -c "
import json, sys
d = {s['transport']: s['metrics']['roundtrip']['p50'] for s in json.load(sys.stdin)['scenarios']}
print(d['c-floor'], d['spin'])")
python3 -c "print('%-8s stun %5d pp %4d floor %4d  stun/pp %.2f stun/floor %.2f pp/floor %.2f'
             % ('$label', $stun, $pp, $floor, $stun / $pp, $stun / $floor, $pp / $floor))"
