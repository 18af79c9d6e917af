"""Helpers every test module may import: the repository's paths, the micro training config, a running
service's REST calls, credentials, and the one `wait_for`. Fixtures live in conftest.py."""

from __future__ import annotations

import multiprocessing
import os
import site
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = REPO / "data" / "fashion-mnist"
ADMIN, READER = "adm-token-123", "read-token-456"
T = TypeVar("T")


def micro_overrides(output_dir: Path, method: str = "selfpatch", *extra: str) -> list[str]:
    """tiny_cpu shrunk to a 2-block, 32-wide ViT on 64 images: 8 steps per epoch."""
    return [
        f"method={method}",
        "model.embed_dim=32",
        "model.num_heads=2",
        "model.depth=2",
        "head.hidden_dim=64",
        "head.bottleneck_dim=32",
        "head.out_dim=128",
        "selfpatch.out_dim=64",
        "crops.local_number=2",
        "optim.batch_size_per_gpu=8",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "data.max_samples=64",
        "data.num_workers=0",
        f"data.path={FASHION_MNIST}",
        f"checkpoint.output_dir={output_dir}",
        "checkpoint.saveckp_freq=1",
        "logging.mlflow=false",
        "logging.progress=off",
        "logging.log_every=2",
        *extra,
    ]


#: The micro config as REST overrides (the service chooses the output folder and the logging).
MICRO = [o for o in micro_overrides(Path("/unused")) if not o.startswith(("checkpoint.output_dir", "logging."))]


def tiny_sweep(name: str) -> dict[str, Any]:
    """DINO vs SelfPatch on micro runs, 2 paired seeds, a k-NN evaluation of each final checkpoint."""
    return {
        "name": name,
        "base": {"preset": "tiny_cpu", "overrides": MICRO},
        "arms": {"list": [{"name": "dino", "overrides": ["method=dino"]}, {"name": "selfpatch"}]},
        "baseline": "dino",
        "seeds": 2,
        "evaluations": [
            {
                "benchmark": "knn",
                "data": str(FASHION_MNIST),
                "overrides": ["max_train_samples=1000", "max_test_samples=300"],
                "final": True,
            }
        ],
        "metrics": {"primary": "knn/top1_k20"},
        "launcher": "local",
        "max_concurrent": 2,
    }


def wait_for(probe: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll `probe()` until it returns something truthy and return it; fail naming `what` on timeout
    (a generous deadline that only guards against hangs, never a speed assertion)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(target: Callable[..., None], args_of: Callable[[int, int], tuple[Any, ...]], world: int = 2) -> list[int]:
    """Start `world` spawned processes `target(*args_of(rank, port))` on one free rendezvous port and return
    their exit codes; a rank still running after 300 s (a hung collective) is killed, not left behind."""
    spawn, port = multiprocessing.get_context("spawn"), free_port()
    workers = [spawn.Process(target=target, args=args_of(rank, port)) for rank in range(world)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        if worker.is_alive():
            worker.kill()
            worker.join()
    return [int(worker.exitcode if worker.exitcode is not None else -1) for worker in workers]


def make_settings(home: Path, db_url: str, tracking_uri: str | None = None, **extra: Any) -> Settings:
    return Settings(
        home=home,
        database_url=db_url,
        admin_tokens=f"admin:{ADMIN}",
        read_tokens=f"viewer:{READER}",
        mlflow_tracking_uri=tracking_uri or f"sqlite:///{home / 'mlruns' / 'mlflow.db'}",
        reconcile_interval_s=0.5,
        **extra,
    )


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------- REST calls to a service


def body(*extra: str, launcher: str = "local", experiment: str = "e2e") -> dict[str, Any]:
    """A micro pretraining run as a submission."""
    return {"experiment": experiment, "preset": "tiny_cpu", "overrides": [*MICRO, *extra], "launcher": launcher}


def get(url: str, path: str) -> Any:
    response = httpx.get(f"{url}/api/v1{path}", headers=auth(), timeout=30)
    response.raise_for_status()
    return response.json()


def post(url: str, path: str, payload: dict[str, Any] | None = None, token: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{url}/api/v1{path}", json=payload, headers=auth(token), timeout=60)


def status_of(url: str, run_id: str) -> str:
    return str(get(url, f"/runs/{run_id}")["status"])


def submit(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = post(url, "/runs", payload)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def settled(url: str, path: str, timeout: float, what: str = "the job to end") -> dict[str, Any]:
    """Wait until the run or evaluation at `path` is terminal and return it."""
    terminal = ("succeeded", "failed", "cancelled")

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = get(url, path)
        return job if job["status"] in terminal else None

    found = wait_for(ended, timeout, what)
    assert found is not None
    return found


class Service:
    """`orchestrator serve` as a process that can be killed without warning and started again."""

    def __init__(self, home: Path, db_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ORCH_")},
            "ORCH_HOME": str(home),
            "ORCH_DATABASE_URL": db_url,
            "ORCH_ADMIN_TOKENS": f"admin:{ADMIN}",
            "ORCH_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "ORCH_RECONCILE_INTERVAL_S": "0.5",
            "ORCH_API_URL": self.url,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        cli = [str(Path(sys.executable).parent / "orchestrator"), "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cli, "--log-level", "warning"], cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(self.ready, 120, "the service to be ready", every=0.2)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no flush
        self.proc.wait(timeout=30)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------- the image's environment


@dataclass(frozen=True)
class Installed:
    """The project as docker/Dockerfile installs it: a wheel (not editable) in a fresh virtual environment."""

    env_dir: Path
    python: Path
    site_packages: Path


def install_wheel(root: Path) -> Installed:
    """`pip wheel --no-deps .` and the wheel installed into a fresh venv under `root`. Its dependencies come
    from this venv's site-packages as a plain path (`deps.pth`), not a reinstall of torch: site does not
    process .pth files inside such a path, so the editable install of the source tree stays invisible."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(root.glob("selfpatch_orchestrator-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "PYTHONPATH", "MLFLOW_", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh_site = next((env_dir / "lib").glob("python3.*/site-packages"))
    (fresh_site / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    return Installed(env_dir, python, fresh_site)
