"""The user shell: the `orchestrator` command line, the HTTP client it speaks through, and the embedded
service the demo and tests start. It sits above the REST service (`api.main`); nothing below imports it."""
