"""Strict types for everything that crosses a boundary (REST bodies and queries, job reports, files read back).

Every string is bounded and printable (no NUL, no newline where a value could land in a script or a log
line), every number is bounded and finite, every name that reaches a scheduler matches that scheduler's
own grammar. The JSON schema carries the constraints, so the OpenAPI says exactly what is accepted.
"""

from __future__ import annotations

__all__ = ["ONE_LINE", "Integer", "strict_keys"]  # defined with the run config, the lowest layer that needs them

from typing import Annotated

from pydantic import Field, StringConstraints

from trainer.config import ONE_LINE, Integer, strict_keys

#: Prose: newlines and tabs allowed, other control characters (NUL first) not.
PROSE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
#: SLURM partitions, accounts, QoS, reservations: what sbatch itself accepts as a name.
SLURM_NAME = r"^[A-Za-z0-9_.\-]+$"
#: Experiment names: path-like segments (`selfpatch/in1k`), each starting with a letter or digit, so
#: neither `..` nor an absolute path nor an empty segment can be written.
EXPERIMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*$"
#: Scheduler job ids as launchers make them (SLURM numbers, Ray submission ids, local keys).
JOB_ID = r"^[A-Za-z0-9_.:\-]+$"

OneLine = Annotated[str, StringConstraints(max_length=1000, pattern=ONE_LINE)]
Host = Annotated[str, StringConstraints(max_length=255, pattern=ONE_LINE)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=ONE_LINE)]
Prose = Annotated[str, StringConstraints(max_length=10_000, pattern=PROSE)]
Reason = Annotated[str, StringConstraints(max_length=4000, pattern=PROSE)]
SlurmName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=SLURM_NAME)]
ExperimentName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=EXPERIMENT_NAME)]
FilePath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=ONE_LINE)]
SchedulerJobId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=JOB_ID)]
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=ONE_LINE)]
#: A page cursor as `next_page_token` writes it (url-safe base64); anything else is refused, naming the field.
Cursor = Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")]
#: A launcher's registry key (local, slurm, ray, tune, dryrun).
LauncherName = Annotated[str, StringConstraints(pattern=r"^[a-z]{1,32}$")]
#: `dotted.key=value`: the key's grammar is in the schema; whether the config has that key is checked by it.
OVERRIDE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=[^\x00-\x1f\x7f]*$"
Override = Annotated[str, StringConstraints(min_length=2, max_length=2000, pattern=OVERRIDE)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
#: Steps, iterations, epochs: far beyond any real run, far below what a 64-bit column holds.
Count = Annotated[Integer, Field(ge=0, le=10**12)]
