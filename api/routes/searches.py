"""The driver jobs of search sweeps: what every job offers (attempts, events, logs, cancel, reports), and
the route through which a search's Tune trials register, with the search job's own token."""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from api.deps import AppState, JobCaller, Reader, SessionDep, StateDep
from api.routes.jobs import add_job_routes
from orchestrator.db.models import Search
from orchestrator.jobs.records import get_job
from orchestrator.sweeps.public import SearchPublic
from orchestrator.sweeps.search import RegisteredTrial, TrialRegistration, register_trial
from orchestrator.sweeps.service import search_public

router = APIRouter(prefix="/searches", tags=["sweeps"])
SearchId = Annotated[str, Path(alias="search_id", description="The search job's id.")]


def public(search: Search, _state: AppState | None = None) -> SearchPublic:
    found: SearchPublic = search_public(search)
    return found


@router.get("/{search_id}", response_model=SearchPublic, summary="A search sweep's Ray Tune job")
def show(ident: SearchId, session: SessionDep, _: Reader) -> SearchPublic:
    return public(get_job(session, Search, ident, "search"))


@router.post(
    "/{search_id}/trials",
    response_model=RegisteredTrial,
    status_code=201,
    summary="Register a Tune trial of the search (the search job's own token)",
    description="Records the trial as a run of the sweep, with the sampled values checked against the search "
    "space; the same Tune trial id again returns the same run (200).",
    responses={200: {"model": RegisteredTrial, "description": "The trial existed (a restored search)."}},
)
def register(_ident: SearchId, body: TrialRegistration, state: StateDep, caller: JobCaller) -> JSONResponse:
    with state.db.transaction() as session:
        search = get_job(session, Search, caller, "search", lock=True)
        registered = register_trial(session, state.settings, search, body, f"job:search-{str(caller)[:8]}")
    return JSONResponse(registered.model_dump(mode="json"), status_code=201 if registered.created else 200)


add_job_routes(router, Search, "search", public, SearchPublic)
