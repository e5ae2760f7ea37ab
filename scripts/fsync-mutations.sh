#!/usr/bin/env bash
# Turns each fsync call site of the storage code into a no-op, one at a time, runs
# `cargo test --release --test power_loss` against it, and restores the file. Prints one line
# per site: CAUGHT (the test failed, as it must) or MISSED (it passed). Exits 1 if any site
# was missed.
#
#   scripts/fsync-mutations.sh [SITE-FILTER...]
#
# With filters, only the sites whose `file:line` contains one of them (e.g. `wal.rs:494`).
# The sites are every `.sync_data()`, `.sync_all()`, `sync_dir(` call in src/storage/{fs,wal,
# store}.rs except the seam's own implementations (`impl Fs`/`impl FsFile` forwarding to
# std::fs or the simulated filesystem, and the `sync_dir` helper's body). A mutated file
# sync becomes `.nosync()`, a directory sync `nosync_dir(`: both added temporarily to
# src/storage/fs.rs, returning Ok without syncing. Environment: POWER_LOSS_SEEDS (default 6).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
filters=("$@")

if ! git diff --quiet -- src/storage; then
    echo "src/storage has uncommitted changes; commit or stash them first" >&2
    exit 1
fi

restore() { git checkout -q -- src/storage; }
build() {
    cargo build --release --lib -q 2>/dev/null || return 1
    # The test's own dependencies besides the library (env_logger, for RUST_LOG).
    local logger
    logger=$(ls -t target/release/deps/libenv_logger-*.rlib | head -1)
    rustc --edition 2021 --test -O -g tests/power_loss.rs -o target/release/power_loss-mutant \
        --extern raft=target/release/libraft.rlib --extern env_logger="$logger" \
        -L dependency=target/release/deps 2>/dev/null
}
trap restore EXIT

# Each run's output (seeds included) is kept here, one file per site.
logs=target/fsync-mutations
mkdir -p "$logs"
build || { echo "the unmutated code does not build" >&2; exit 1; }
if ! POWER_LOSS_SEEDS=${POWER_LOSS_SEEDS:-6} target/release/power_loss-mutant >"$logs/unmutated.log" 2>&1; then
    echo "power_loss fails without a mutation (see $logs/unmutated.log)" >&2
    exit 1
fi

sites=$(python3 - <<'EOF'
import re
for path in ["src/storage/fs.rs", "src/storage/wal.rs", "src/storage/store.rs"]:
    lines = open(path).read().split("\n")
    skip = False
    for i, line in enumerate(lines, 1):
        code = line.split("//")[0]
        # The seam's forwarding methods and the helper's body are not call sites.
        if re.match(r"\s*(pub fn sync_dir\(&self|pub fn sync_data\(&self|pub fn sync_all\(&self|pub\(crate\) fn sync_dir\()", code):
            skip = True
        if skip:
            if code.strip() == "}":
                skip = False
            continue
        if re.search(r"\.sync_data\(\)|\.sync_all\(\)|\bsync_dir\(", code):
            print(f"{path}:{i}")
EOF
)

missed=0
for site in $sites; do
    if ((${#filters[@]})); then
        wanted=0
        for f in "${filters[@]}"; do [[ $site == *"$f"* ]] && wanted=1; done
        ((wanted)) || continue
    fi
    file=${site%%:*}
    line=${site##*:}
    text=$(sed -n "${line}p" "$file" | sed 's/^ *//')
    cat >>src/storage/fs.rs <<'EOF'

impl FsFile {
    pub fn nosync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Fs {
    pub fn nosync_dir(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn nosync_dir(_: &Fs, _: &Path) -> Result<(), StorageError> {
    Ok(())
}
EOF
    sed -i "${line}s/\.sync_data()/.nosync()/; ${line}s/\.sync_all()/.nosync()/; ${line}s/self\.sync_dir(/self.nosync_dir(/; ${line}s/\([^.a-z_]\)sync_dir(/\1super::fs::nosync_dir(/" "$file"
    if [[ $file == src/storage/fs.rs ]]; then
        sed -i "${line}s/super::fs::nosync_dir(/nosync_dir(/" "$file"
    fi
    # The library and the test alone: `cargo test` would also rebuild every binary.
    if ! build; then
        echo "BUILD FAILED $site: $text"
        missed=1
    elif POWER_LOSS_SEEDS=${POWER_LOSS_SEEDS:-6} target/release/power_loss-mutant \
        >"$logs/${file##*/}-$line.log" 2>&1; then
        echo "MISSED $site: $text"
        missed=1
    else
        echo "CAUGHT $site: $text"
    fi
    restore
done
exit $missed
