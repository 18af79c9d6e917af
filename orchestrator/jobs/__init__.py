"""The job layer: one torch-free mechanism for every kind of job the orchestrator drives.

* `files`: the job file (`job.json`: kind + payload + where to report), result files, exit codes, tokens.
* `kinds`: the table of kinds (train, evaluate) and the `JobKind` protocol each implements service-side.
* `records`: SQL lookups, lifecycle transitions, events, attempts and reports shared by every kind.
* `python -m orchestrator.jobs FOLDER`: the one entry point launchers start; it runs the kind's runner
  (`train`, `evaluate`), which imports torch there, on the job's machine, never in the service.
* `fake`: a scripted launcher that drives the reconciler through every branch in milliseconds.
"""
