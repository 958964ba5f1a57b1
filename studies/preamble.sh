# Sourced first by every studies/make_*.sh: strict mode, the repository root as the working
# folder (so `python hybrid.py` and `python -m studies.X` resolve), and where a study resumes.
#   PYTHON: the interpreter (default python).
#   last_run DIR: the newest run folder under DIR, or nothing.
#   where_to_run DIR: "--resume" that folder (a stopped call left it: resumed), or "--output DIR".
#   need_results FILE...: each a results.json that hybrid.py wrote, or one line and exit 2, before
#     any long run starts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
last_run() { ls -d "$1"/*/ 2>/dev/null | tail -1 || true; }
where_to_run() {
    local run
    run=$(last_run "$1")
    if [ -n "$run" ]; then echo "--resume $run"; else echo "--output $1"; fi
}
need_results() { "$PYTHON" -m studies.common "$@" || exit 2; }
