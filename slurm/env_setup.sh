# ---- slurm/env_setup.sh: shared by every UMT job script; `umt submit` inlines it here. ----
# The job starts with the submitter's environment (sbatch exports it) plus this activation:
{{activate}}
UMT_PYTHON={{python}}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "[umt] $(date -u +%FT%TZ) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}" \
  "on ${SLURM_JOB_NODELIST} (python: $(command -v "$UMT_PYTHON"))"

# umt_run CMD...: run CMD (an srun) and wait for it. Slurm signals only this shell
# (--signal=B:USR1@S, `scancel --batch`); forward USR1 to the tasks, which checkpoint at the
# next step boundary, and keep waiting. TERM is forwarded as USR1 too: srun answers a TERM by
# SIGKILLing its tasks, which would lose the steps since the last checkpoint.
umt_run() {
  "$@" &
  local child=$! rc
  trap 'echo "[umt] $(date -u +%FT%TZ) USR1: checkpoint and requeue"; kill -USR1 "$child"' USR1
  trap 'echo "[umt] $(date -u +%FT%TZ) TERM: forwarded as USR1"; kill -USR1 "$child"' TERM
  while true; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break # a signal interrupted `wait`: the child still runs
  done
  trap - USR1 TERM
  return "$rc"
}
# ---- end of slurm/env_setup.sh ----
