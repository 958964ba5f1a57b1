# Sourced by the make_*.sh scripts (from the repository root): where a resumable study runs.
# last_run DIR: the newest run folder under DIR, or nothing.
# where_to_run DIR: "--resume" that folder (a stopped call left it: resumed), or "--output DIR" for a new one.
last_run() { ls -d "$1"/*/ 2>/dev/null | tail -1 || true; }
where_to_run() {
    local run
    run=$(last_run "$1")
    if [ -n "$run" ]; then echo "--resume $run"; else echo "--output $1"; fi
}
