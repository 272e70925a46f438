#!/usr/bin/env bash
# Keep the saved progress of bench rows and models in flight (benchmarks/results/*/partial/ and
# */models/.partial-*/, not tracked) on a side branch, so that a new checkout of the project
# can resume a row cut short instead of starting it over (an i-BAU or SAU row is hours).
#
#   bash scripts/keep_partial_runs.sh save      # snapshot them to the branch partial-runs
#   bash scripts/keep_partial_runs.sh restore   # put them back; files already here are kept
#
# `save` writes one parentless commit each time and moves the branch to it, so the branch never
# grows a history; it never touches the index, the work tree or the current branch. A row still
# checks on resume that its saved state is its own (cell, torch version, threads).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
branch=partial-runs

case "${1:-}" in
save)
    mapfile -t found < <(find benchmarks/results -mindepth 2 -maxdepth 3 -type d \
        \( -name partial -o -name '.partial-*' \) | sort)
    if [ ${#found[@]} -eq 0 ]; then
        echo "no saved progress under benchmarks/results: nothing to keep"
        exit 0
    fi
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    index=$scratch/index  # a fresh index of its own: the project's is not touched
    GIT_INDEX_FILE=$index git add --force -- "${found[@]}"
    tree=$(GIT_INDEX_FILE=$index git write-tree)
    commit=$(git commit-tree "$tree" -m "saved progress of bench runs in flight, $(date -u +%FT%TZ)")
    git update-ref "refs/heads/$branch" "$commit"
    echo "kept ${found[*]} on branch $branch ($commit)"
    ;;
restore)
    if ! git rev-parse --verify --quiet "refs/heads/$branch" >/dev/null; then
        if git rev-parse --verify --quiet "refs/remotes/origin/$branch" >/dev/null; then
            branch=origin/$branch
        else
            echo "no branch $branch: nothing to restore"
            exit 0
        fi
    fi
    git archive "$branch" | tar -x --skip-old-files -f -
    echo "restored the saved progress of $branch (files already here kept as they are)"
    ;;
*)
    echo "usage: bash scripts/keep_partial_runs.sh save|restore" >&2
    exit 2
    ;;
esac
