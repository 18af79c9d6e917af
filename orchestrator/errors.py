"""Errors of the domain operations: each carries its HTTP status, a stable code and the field to blame."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine code and (for 422) the offending field."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.field = detail, field


class NotFoundError(ServiceError):
    status, code = 404, "not_found"


class ConflictError(ServiceError):
    status, code = 409, "conflict"


class InvalidInputError(ServiceError):
    status, code = 422, "invalid_input"


class ReportRefusedError(ConflictError):
    """A job's report that contradicts what the service recorded (another attempt's or job's scheduler id):
    refused, and the refusal is itself recorded as an event of the job."""
