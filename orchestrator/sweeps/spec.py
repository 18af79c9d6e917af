"""The sweep file: a base config, arms (grid, zip or a list) and seeds, or a search space; evaluations,
metrics, where and how much.

Validated like run configs (strict pydantic). An ablation is expanded into trials, one per (arm, seed), each
a full run config; a search's trials are sampled by Ray Tune as it runs (`Search`). A sweep's identity is its
name and the hash of what determines its science (base, arms or search, seeds, evaluations, metrics); where
it runs and how many at once may change between calls.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from orchestrator.launchers import LauncherName
from orchestrator.launchers.base import Resources
from orchestrator.schemas import EvalSpec, PresetName
from orchestrator.strict import ExperimentName, FiniteFloat, Integer, Override, Prose
from trainer.presets import ConfigError, format_validation_error, parse_yaml

#: Sweep and arm names: they name MLflow runs and CLI arguments, so letters, digits and `_.=,-` only.
SweepName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
ArmName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,\-]*$")]
DOTTED = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
Key = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=DOTTED)]
Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Base(_Strict):
    preset: PresetName = Field(description="The preset every trial starts from.")
    overrides: list[Override] = Field(default_factory=list, max_length=200, description="Applied to every trial.")


class Arm(_Strict):
    name: ArmName
    overrides: list[Override] = Field(default_factory=list, max_length=200)


class Arms(_Strict):
    """Exactly one of: a cartesian grid over dotted keys, keys varied together (zip), or named arms."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    grid: dict[Key, list[Scalar]] | None = Field(None, max_length=8, description="Every combination of the values.")
    zipped: dict[Key, list[Scalar]] | None = Field(
        None, alias="zip", max_length=8, description="The i-th values of every key together."
    )
    named: list[Arm] | None = Field(None, alias="list", max_length=200, description="Named arms (ablations).")

    @model_validator(mode="after")
    def _one_form(self) -> Arms:
        given = [name for name in ("grid", "zipped", "named") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"arms: give exactly one of grid, zip or list (got {len(given)})")
        if self.zipped is not None and len({len(v) for v in self.zipped.values()}) > 1:
            raise ValueError("arms.zip: every list must have the same length")
        for values in (self.grid or self.zipped or {}).values():
            if not values:
                raise ValueError("arms: a key needs at least one value")
        if self.named is not None and len({a.name for a in self.named}) != len(self.named):
            raise ValueError("arms.list: arm names must be unique")
        return self

    def expand(self) -> list[Arm]:
        """The arms in a stable order; grid and zip arms are named after what they set (`k=4,loss_weight=0.1`)."""
        if self.named is not None:
            return list(self.named)
        table = self.grid if self.grid is not None else self.zipped
        assert table is not None
        keys = list(table)
        rows = itertools.product(*table.values()) if self.grid is not None else zip(*table.values(), strict=True)
        arms = []
        for values in rows:
            overrides = [f"{key}={yaml_scalar(value)}" for key, value in zip(keys, values, strict=True)]
            name = ",".join(
                f"{key.rsplit('.', 1)[-1]}={yaml_scalar(value)}" for key, value in zip(keys, values, strict=True)
            )
            arms.append(Arm(name=name[:100], overrides=overrides))
        return arms


def yaml_scalar(value: Scalar) -> str:
    """A value as the right-hand side of a dotted override."""
    return "true" if value is True else "false" if value is False else str(value)


class Metrics(_Strict):
    primary: Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_./\-]+$")] = Field(
        description="An evaluation metric of each trial's final checkpoint, e.g. knn/top1_k20."
    )
    direction: Literal["max", "min"] = "max"
    secondary: list[Annotated[str, StringConstraints(max_length=250, pattern=r"^[A-Za-z0-9_./\-]+$")]] = Field(
        default_factory=list, max_length=20
    )
    alpha: FiniteFloat = Field(0.05, gt=0, lt=1, description="Significance level after Holm's correction.")


Bounds = Annotated[list[FiniteFloat | Integer], Field(min_length=2, max_length=2)]
IntBounds = Annotated[list[Integer], Field(min_length=2, max_length=2)]
DEFAULT_SEEDS = 3
FORMS = ("uniform", "loguniform", "randint", "choice", "grid")


class Dimension(_Strict):
    """One searched config key: exactly one of uniform, loguniform or randint (bounds), choice (sampled from
    values) or grid (every value, in order; each grid point is sampled `num_samples` times)."""

    uniform: Bounds | None = Field(None, description="[low, high]: uniform.")
    loguniform: Bounds | None = Field(None, description="[low, high], low > 0: log-uniform.")
    randint: IntBounds | None = Field(None, description="[low, high): an integer.")
    choice: list[Scalar] | None = Field(None, min_length=1, max_length=100, description="One of these values.")
    grid: list[Scalar] | None = Field(None, min_length=1, max_length=100, description="Each of these values.")

    @model_validator(mode="after")
    def _one_form(self) -> Dimension:
        given = [name for name in FORMS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(FORMS)} (got {len(given)})")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be below high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be positive")
        return self

    @property
    def form(self) -> str:
        return next(name for name in FORMS if getattr(self, name) is not None)

    def contains(self, value: Any) -> bool:
        """Whether a sampled value lies in this dimension (what a search job registers is checked with it)."""
        values = self.choice if self.choice is not None else self.grid
        if values is not None:
            return any(value == c and type(value) is type(c) for c in values)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.randint is not None:
            return isinstance(value, int) and self.randint[0] <= value < self.randint[1]
        low, high = self.uniform or self.loguniform or (0.0, 0.0)
        return low <= value <= high


class Asha(_Strict):
    """Asynchronous successive halving over epochs (its maximum is the base config's `optim.epochs`)."""

    grace_period: Integer = Field(1, ge=1, le=10_000, description="Epochs every trial runs before it can stop.")
    reduction_factor: FiniteFloat = Field(2.0, gt=1, le=100, description="1/reduction_factor go on at each rung.")


class Search(_Strict):
    """A hyper-parameter search Ray Tune runs: sampled trials, the sweep's primary metric reported every epoch."""

    space: dict[Key, Dimension] = Field(min_length=1, max_length=20, description="Dotted config key -> values.")
    num_samples: Integer = Field(8, ge=1, le=1000, description="Trials to sample.")
    algorithm: Literal["random", "tpe"] = Field("random", description="random (Tune's own) or tpe (Optuna).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops poor trials early; fifo never.")
    asha: Asha = Field(default_factory=Asha)
    monitor: EvalSpec | None = Field(
        None,
        description="A benchmark run on each trial's teacher at every epoch end (the online k-NN); the primary "
        "metric is then `<benchmark>/<metric>`. Without it the metric is a training one (train/loss).",
    )
    trial_cpus: Integer = Field(1, ge=1, le=512, description="CPUs per trial (Ray resources).")
    trial_gpus: Integer = Field(0, ge=0, le=64, description="GPUs per trial (Ray resources).")
    seed: Integer = Field(0, ge=0, le=2**31 - 1, description="The search algorithm's seed (not the trials').")


class Budget(_Strict):
    accelerator_hours: FiniteFloat | None = Field(None, gt=0, description="Stop launching trials past this.")


class SweepSpec(_Strict):
    """A sweep file."""

    name: SweepName
    description: Prose = ""
    experiment: ExperimentName | None = Field(None, description="Default: sweeps/<name>.")
    base: Base
    arms: Arms | None = Field(None, description="An ablation's arms (give arms or search).")
    search: Search | None = Field(None, description="A hyper-parameter search (give arms or search).")
    baseline: ArmName | None = Field(None, description="The arm the others are compared with; default: the first.")
    seeds: list[Annotated[Integer, Field(ge=0, le=2**31 - 1)]] | Annotated[Integer, Field(ge=1, le=100)] | None = Field(
        None,
        description="Seeds (a list) or how many (0..n-1; default 3); each arm runs each seed, paired across arms. "
        "Not for a search: its trials train with the base seed.",
    )
    evaluations: list[EvalSpec] = Field(default_factory=list, max_length=20)
    metrics: Metrics
    launcher: LauncherName | None = None
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: Integer = Field(4, ge=1, le=10_000, description="Trials running at once.")
    budget: Budget = Field(default_factory=Budget)

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> SweepSpec:
        if (self.arms is None) == (self.search is None):
            raise ValueError("give exactly one of arms (an ablation) or search (a hyper-parameter search)")
        if self.search is not None:
            self._check_search(self.search)
        names = [arm.name for arm in self.arm_list]
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not an arm (arms: {', '.join(names)})")
        if isinstance(self.seeds, list) and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: each seed once")
        return self

    def _check_search(self, search: Search) -> None:
        if self.launcher not in (None, "ray"):
            raise ValueError("launcher: a search runs on Ray Tune: use launcher ray (or leave it out)")
        if self.baseline is not None:
            raise ValueError("baseline: a search has no baseline arm")
        if self.seeds is not None:
            raise ValueError("seeds: each search trial trains with the base seed (set seed=N in base.overrides)")
        primary = self.metrics.primary
        sources = ["train/"] + ([f"{search.monitor.benchmark}/"] if search.monitor else [])
        if not primary.startswith(tuple(sources)):
            raise ValueError(
                f"metrics.primary: a search reports it every epoch, so it must start with {' or '.join(sources)}"
                + ("" if search.monitor else " (or add search.monitor, e.g. a k-NN of the teacher)")
            )

    @property
    def arm_list(self) -> list[Arm]:
        """The arms of an ablation (a search has none: Tune samples its trials)."""
        return self.arms.expand() if self.arms is not None else []

    @property
    def launcher_name(self) -> str | None:
        return "ray" if self.search is not None else self.launcher

    @property
    def seed_list(self) -> list[int]:
        if self.search is not None:
            return []  # each search trial trains with the base seed
        seeds = DEFAULT_SEEDS if self.seeds is None else self.seeds
        return list(seeds) if isinstance(seeds, list) else list(range(seeds))

    @property
    def baseline_arm(self) -> str:
        return self.baseline or (self.arm_list[0].name if self.arm_list else "")

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"sweeps/{self.name}"

    def science(self) -> dict[str, Any]:
        """What determines the results (the hash, and the diff a changed file is refused with)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data.setdefault("baseline", self.baseline_arm)
        data["seeds"] = self.seed_list
        keys = ("base", "arms", "search", "baseline", "seeds", "evaluations", "metrics")
        return {key: data.get(key) for key in keys}

    def spec_hash(self) -> str:
        canonical = json.dumps(self.science(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class TrialPlan:
    arm: str
    seed: int
    overrides: list[str]


def plan(spec: SweepSpec) -> list[TrialPlan]:
    """Arms x seeds, arm-major; the seed is also the trial's data-order and augmentation seed."""
    return [
        TrialPlan(arm.name, seed, [*spec.base.overrides, *arm.overrides, f"seed={seed}"])
        for arm in spec.arm_list
        for seed in spec.seed_list
    ]


def extension_of(old: SweepSpec, new: SweepSpec) -> str | None:
    """None if `new` only adds arms or seeds to `old` (with the same base, evaluations and metrics); else why not."""
    if old.search is not None or new.search is not None:
        return "a search cannot be extended: create a sweep with a new name"
    if old.science()["base"] != new.science()["base"]:
        return "the base config changed"
    for key in ("evaluations", "metrics", "baseline"):
        if old.science()[key] != new.science()[key]:
            return f"{key} changed"
    old_arms = {a.name: a.overrides for a in old.arm_list}
    new_arms = {a.name: a.overrides for a in new.arm_list}
    changed = [name for name in old_arms if name in new_arms and old_arms[name] != new_arms[name]]
    if changed or set(old_arms) - set(new_arms):
        return f"arms changed or were removed: {', '.join(changed or sorted(set(old_arms) - set(new_arms)))}"
    if set(old.seed_list) - set(new.seed_list):
        return "seeds were removed"
    return None


def pooled(specs: Sequence[SweepSpec]) -> SweepSpec:
    """The one sweep that several ablations with disjoint seeds add up to: the first with every seed.

    Pooling is sound only where the sweeps would have been one sweep with more seeds: the same base, arms,
    baseline, evaluations and metrics. Raises ValueError naming the first difference or the shared seeds.
    """
    if len(specs) < 2:
        raise ValueError("pool at least two sweeps")
    first = specs[0]
    if any(spec.search is not None for spec in specs):
        raise ValueError("a search has no seeds to pool")
    science = {key: value for key, value in first.science().items() if key != "seeds"}
    seen: dict[int, str] = {}
    for spec in specs:
        other = {key: value for key, value in spec.science().items() if key != "seeds"}
        if other != science:
            raise ValueError(f"{spec.name} and {first.name} differ in more than their seeds: {diff(science, other)[0]}")
        shared = sorted(seed for seed in spec.seed_list if seed in seen)
        if shared:
            raise ValueError(f"{spec.name} repeats seed {shared[0]} of {seen[shared[0]]}: pooled seeds must differ")
        seen.update(dict.fromkeys(spec.seed_list, spec.name))
    return first.model_copy(update={"seeds": sorted(seen)})


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Readable differences between two JSON trees: `- key: old` / `+ key: new` lines."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += diff(a, b, f"{where}.")
        elif a != b:
            if a is not None:
                lines.append(f"- {where}: {json.dumps(a)}")
            if b is not None:
                lines.append(f"+ {where}: {json.dumps(b)}")
    return lines


def load_spec(source: str | Path | Mapping[str, Any]) -> SweepSpec:
    """A sweep file (YAML path, a preset under configs/sweeps, or its parsed mapping), validated."""
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            from trainer.presets import preset_dir

            path = preset_dir() / "sweeps" / f"{str(source).removesuffix('.yaml')}.yaml"
        if not path.is_file():
            raise ConfigError(f"no sweep file or sweep preset named {str(source)!r}")
        try:
            data = parse_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path.name}: invalid YAML: {exc}") from exc
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        message, field = format_validation_error(exc)
        raise ConfigError(message, field=field) from exc
