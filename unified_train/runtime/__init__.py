"""The process a job runs in: its environment and compiler pins (env), its ranks (ranks), and the job (job)."""
