"""A data type's lifecycle timeline: the repository's deployments joined with the live state.

The repository (``RepositoryView``) knows every deployment a job made of a data type's
versions: as its model (role "") or as its candidate ("canary 10%", "shadow"), when it
started and when it stopped and why. The state topic (``ModelStateView``) knows how many
records each model scored, the current candidate's figures and the current model's drift.
:func:`timeline` puts them side by side, one event per deployment in time order, so the
page can draw "what served when, how much, and how it is doing" from one answer.

Usage is matched as well as the two sources allow: a model of the state's history (job,
name, version, since) is counted for the deployment of that job, name and version (as the
data type's model) whose start is closest to its ``since``. The state's ids cannot be used
for this: a model's id there is its descriptor's digest, which a rollback or a promotion
changes. A past candidate's usage is unknown (the state keeps only the current
candidate's figures); so is the usage of models replaced before the state service started
(see ``ModelStateView``'s history).
"""
from __future__ import annotations

import sys

from modelserving.state.repository import RepositoryView
from modelserving.state.view import ModelStateView, model_label


def timeline(repository: RepositoryView, state: ModelStateView, data_type: str) -> dict | None:
    """The timeline of ``data_type`` (see the module's docstring); None when the repository
    has no version of it."""
    history = repository.history(data_type)
    if history is None:
        return None
    current = (state.state(data_type) or {}).get("jobs", {})
    # every model the state remembers (HISTORY_KEPT per job), of every job
    used = (state.history(data_type, sys.maxsize) or {}).get("models", [])
    events = []
    for entry in history["versions"]:
        for deployment in entry["deployments"]:
            events.append(_event(entry, deployment))
    events.sort(key=lambda e: (e["deployed_ms"] or 0, e["created_ms"] or 0, e["version"], e["job"]))
    _add_usage(events, used)
    for event in events:
        _add_live_figures(event, current.get(event["job"]))
    return {"data_type": data_type, "events": events,
            "history_complete_since_ms": state.history_complete_since_ms,
            "note": "usage is known for the data type's models since the state service started "
                    "and for the current candidate; empty where unknown"}


def _event(entry: dict, deployment: dict) -> dict:
    accepted = deployment["outcome"] == "ACCEPTED"
    role = deployment["role"]
    if not accepted:
        status = deployment["outcome"]
    elif deployment["retired_ms"]:
        status = "RETIRED"
    else:
        status = "CANDIDATE" if role else "SERVING"
    return {"version": entry["version"], "name": entry["name"], "model_id": entry["model_id"],
            "model": model_label(entry["name"], entry["version"]), "type": entry["type"],
            "digest": entry["digest"], "created_ms": entry["created_ms"], "job": deployment["job"],
            "role": role, "role_label": deployment["role_label"], "outcome": deployment["outcome"],
            "status": status, "deployed_ms": deployment["deployed_ms"],
            "deployed": deployment["deployed"], "retired_ms": deployment["retired_ms"],
            "retired": deployment["retired"], "retired_by": deployment["retired_by"],
            "note": deployment["note"], "usage": None, "candidate": None, "drift": None}


def _add_usage(events: list[dict], used: list[dict]) -> None:
    """Each model of the state's history counted for the closest deployment of it as the
    data type's model on its job (see the module's docstring)."""
    for model in used:
        matching = [e for e in events if e["status"] in ("SERVING", "RETIRED") and not e["role"]
                    and e["job"] == model["job"] and e["version"] == model["version"]
                    and e["name"] == model["name"]]
        if not matching:
            continue
        closest = min(matching, key=lambda e: abs((e["deployed_ms"] or 0) - (model["since_ms"] or 0)))
        closest["usage"] = (closest["usage"] or 0) + model["usage"]


def _add_live_figures(event: dict, job: dict | None) -> None:
    """The current candidate's figures on its event, the current model's drift on its."""
    if job is None:
        return
    candidate = job.get("candidate")
    if (event["status"] == "CANDIDATE" and candidate is not None
            and (candidate["version"], candidate["name"]) == (event["version"], event["name"])):
        event["candidate"] = candidate
        event["usage"] = candidate["records"]
    model = job.get("model")
    if (event["status"] == "SERVING" and model is not None
            and (model["version"], model["name"]) == (event["version"], event["name"])):
        event["drift"] = drift_summary(job.get("drift"))


def drift_summary(drift: dict | None) -> dict | None:
    """The state view's drift (``view._drift_json``) reduced to its flag and its largest PSI
    (input features and output), the figures a timeline has room for."""
    if drift is None:
        return None
    values = list(drift["features"].items())
    if drift["output_psi"] is not None:
        values.append(("output", drift["output_psi"]))
    worst = max(values, key=lambda pair: pair[1], default=(None, None))
    return {"flagged": drift["flagged"], "psi_max": worst[1], "psi_max_of": worst[0],
            "threshold": drift["threshold"], "rows": drift["rows"],
            "flagged_features": drift["flagged_features"]}


def timelines(repository: RepositoryView, state: ModelStateView) -> dict:
    """Every data type of the repository's timeline."""
    data_types = {data_type: timeline(repository, state, data_type)
                  for data_type in repository.data_types()}
    data_types = {k: v for k, v in data_types.items() if v is not None}
    return {"data_types": data_types, "count": len(data_types)}


__all__ = ["drift_summary", "timeline", "timelines"]
