"""Where a workflow keeps its files: its Storage, and the content hash that names cached entries."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from orchestrator.spec import Workflow
from tasks.storage import Storage


def storage_for(spec: Workflow) -> Storage:
    s3 = spec.storage.s3
    return Storage(spec.storage.root, endpoint_url=s3.endpoint_url if s3 else None,
                   region=s3.region if s3 else None, anon=bool(s3 and s3.anon),
                   retries=spec.storage.retries.policy())


def precheck(spec: Workflow) -> Storage:
    """What a run can check before it starts anything, cheaply (no torch, no MLflow): the storage root
    reachable and writable, and a tracking server that answers. A mistake exits 2 naming its key; returns
    the run's storage."""
    from orchestrator.tracking import check_reachable
    from tasks.errors import UserError

    storage = storage_for(spec)
    try:
        storage.check()
    except UserError as exc:
        raise exc.under("storage.root") from None
    check_reachable(spec, storage)
    return storage


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
