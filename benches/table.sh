# Shared by the comparison scripts (sourced): the numbers of their result tables.
#
# Results are lines `KEY1 KEY2 SECONDS` in a file; `failed` is an associative array whose
# "KEY1 KEY2" entries mark runs that failed.

# median FILE KEY1 KEY2: the median of the seconds recorded for KEY1 KEY2, FAILED, or "-".
median() {
    if [ -n "${failed["$2 $3"]:-}" ]; then
        echo FAILED
        return
    fi
    awk -v a="$2" -v b="$3" '$1 == a && $2 == b { print $3 }' "$1" | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) printf "%.3f\n", v[(NR + 1) / 2]
            else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}

# ratio A B: A / B to two decimals, or "-" when either is not a number.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || b == 0) print "-"; else printf "%.2f\n", a / b }'; }
