# Shared by scripts/test and scripts/flake-check (sourced, not run): build every test target of
# one sqlx version once, then run the test binaries a few at a time.

# clippy's lints run during the test build (clippy-driver as the workspace's rustc wrapper, the
# way `cargo clippy` runs it): one compile of the crate and its dependencies per sqlx version
# instead of a `cargo check` pass plus a build. Warnings are errors, as with
# `cargo clippy -- -D warnings`.
RUSTC_WORKSPACE_WRAPPER="${RUSTC_WORKSPACE_WRAPPER:-$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)}"
[ -n "$RUSTC_WORKSPACE_WRAPPER" ] || { echo "clippy-driver not found: run \`rustup component add clippy\`" >&2; exit 1; }
export RUSTC_WORKSPACE_WRAPPER
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

# build_tests LIST CARGO_ARGS...: builds every test target (lib, bins, integration tests,
# benches, examples) of the workspace (the library and poolwatch-cli, in one build: the
# library's tests then run on the sqlx the CLI enables, TLS included) and writes their
# executables to LIST.
build_tests() {
  local list=$1
  shift
  cargo test --quiet --no-run --workspace --all-targets "$@" --message-format=json-render-diagnostics |
    jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null) | .executable' >"$list"
  [ -s "$list" ] || { echo "no test executables built" >&2; return 1; }
}

# run_tests LIST OUT JOBS: runs the executables of LIST, JOBS at a time (they mostly wait on
# servers), the slowest first. Each one's output goes to OUT/<name>.log and is printed whole
# when it fails (its `test result:` line when it passes). Benches run in their quick mode.
# Returns non-zero if any failed. Runs in a subshell of its own, so its `jobs` and `wait` see
# only its binaries, not the caller's background work (a CPU hog, another pass).
run_tests() (
  local list=$1 out=$2 jobs=$3 exe name
  mkdir -p "$out"
  while read -r exe; do
    name=$(basename "$exe")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    (
      s=$(date +%s)
      rc=0
      # A hung binary fails after 10 minutes instead of holding CI to its limit.
      timeout -k 10 600 "$exe" >"$out/$name.log" 2>&1 || rc=$?
      echo "$rc" >"$out/$name.rc"
      {
        echo "--- ${name%-*} ($(($(date +%s) - s))s, exit $rc)"
        if [ "$rc" != 0 ]; then
          cat "$out/$name.log"
        elif grep -q '^test result:' "$out/$name.log"; then
          grep '^test result:' "$out/$name.log"
        else
          tail -4 "$out/$name.log"
        fi
      } >"$out/$name.summary"
      cat "$out/$name.summary"
    ) &
  done < <(slowest_first "$list")
  wait
  ! grep -qv '^0$' "$out"/*.rc
)

# The binaries known to take longest (on a 2-core machine) first, so the last ones are short.
slowest_first() {
  local slow='artefacts|fleet_e2e|listener|acquire|pooler_causes|ledger|telemetry|lifecycle|doctor|health|heartbeat|graphile_worker'
  grep -E "/($slow)-[0-9a-f]+$" "$1" || true
  grep -vE "/($slow)-[0-9a-f]+$" "$1" || true
}

# failed_tests OUT...: the names of the binaries that failed.
failed_tests() {
  local rc
  for rc in "$@"; do
    [ -f "$rc" ] && [ "$(cat "$rc")" != 0 ] && basename "$rc" .rc | sed 's/-[0-9a-f]*$//'
  done
  return 0
}

# test_counts FILES...: one line adding up every `test result:` line.
test_counts() {
  cat "$@" 2>/dev/null | awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { printf "%d passed, %d failed", p, f }'
}
