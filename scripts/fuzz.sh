#!/usr/bin/env bash
# Runs every native fuzz target of the repository for FUZZTIME (default 5m), one at a time on one
# worker; FUZZ (a regular expression) picks targets by "package target". A target fails when it
# writes a failing input under testdata/fuzz/, or fails in another way than Go's fuzzing
# coordinator sometimes ends a time-bounded run: "context deadline exceeded" when a worker is
# still busy at the deadline, which finds nothing.
set -u
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-5m}
FUZZ=${FUZZ:-.}
failed=0
for file in $(git ls-files '*_test.go' | xargs grep -l '^func Fuzz'); do
  pkg=./$(dirname "$file")
  for target in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$file"); do
    grep -Eq -- "$FUZZ" <<<"$pkg $target" || continue
    corpus="$(dirname "$file")/testdata/fuzz/$target"
    before=$(ls "$corpus" 2>/dev/null | wc -l)
    echo "== $pkg $target ($FUZZTIME)"
    if out=$($GO test -run '^$' -fuzz "^$target\$" -fuzztime "$FUZZTIME" -parallel=1 "$pkg" 2>&1); then
      grep '^fuzz: elapsed' <<<"$out" | tail -1
      continue
    fi
    after=$(ls "$corpus" 2>/dev/null | wc -l)
    if [ "$after" -eq "$before" ] && [ "$(grep -c -- '--- FAIL' <<<"$out")" -eq 1 ] && grep -q '^    context deadline exceeded$' <<<"$out"; then
      grep '^fuzz: elapsed' <<<"$out" | tail -1
      echo "   (ended by the fuzzing coordinator's deadline race; no failing input)"
      continue
    fi
    echo "$out"
    failed=1
  done
done
exit $failed
