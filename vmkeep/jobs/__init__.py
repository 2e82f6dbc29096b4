"""What the master and the proxies share about jobs: statuses, the task queue, settling a run,
the master key, and opening a registered hypervisor or repository. Neither side imports the other."""
