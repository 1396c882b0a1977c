"""The fleet page's two GET routes, for the collector: ``/`` and ``/box/<id>``.

They read the report store and, when the collector knows the repository
(``OPQ_COLLECTOR_REPO``), its releases and history for the rollout numbers; rendering is
:mod:`.fleetpage`'s. Each returns (HTTP status, body, headers) and never raises for what a
request contains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError, RepositoryError
from . import fleetpage, stage
from .rollout import Health, latest_views
from .store import ReportRecord, Store

Page = tuple[int, bytes, tuple[tuple[str, str], ...]]
BOX_PREFIX = "/box/"
#: Reports shown on a box's page.
HISTORY_SHOWN = 100


def _health(repo: Path | None, latest: list[ReportRecord], now: datetime) -> list[Health]:
    if repo is None:
        return []
    try:
        return stage.status(repo, latest_views(latest), now)
    except (OSError, ConfigError, RepositoryError):  # ConfigError: not a repository
        return []  # the page still lists the boxes; `rollout status` names the problem


def fleet(store: Store, query: Mapping[str, Sequence[str]], repo: Path | None,
          now: datetime, page_size: int = fleetpage.PAGE_SIZE) -> Page:
    """``/``: rollouts, the page the parsed query string asks for of the boxes its filters
    select, conflicts.

    The newest report of every box is read once (one indexed query over ``latest``) and
    filtered and sliced here, not in SQL: the rollout numbers, the stale count and the
    filter form's choices need every box anyway, and the filters are over what boxes sent
    (``rollout.box_view``'s type rules: ``true`` is no version, another channel's install
    is 0), which SQLite's ``json_extract`` and PostgreSQL's ``jsonb`` would each have to
    repeat exactly. Only the page's rows are rendered (docs/performance.md, "Fleet page":
    ``bench/fleetpage.py`` renders the fleet in one table, as before, with ``page_size``)."""
    latest = store.latest()
    page = fleetpage.fleet_page(latest, _health(repo, latest, now),
                                store.conflicts(limit=fleetpage.CONFLICTS_SHOWN),
                                fleetpage.Filters.from_query(query), now,
                                conflict_count=store.conflict_count(),
                                page=fleetpage.requested_page(query), page_size=page_size)
    return 200, page, fleetpage.HEADERS


def box(store: Store, path: str, now: datetime) -> Page:
    """``/box/<id>``: ``path`` is WSGI's PATH_INFO (bytes as latin-1, already unquoted)."""
    raw = path.removeprefix(BOX_PREFIX)
    try:
        box_id = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        box_id = raw  # not UTF-8 bytes: no box has such an id, the lookup finds nothing
    history = store.history(box_id, limit=HISTORY_SHOWN)
    if not history:
        return 404, fleetpage.not_found(), fleetpage.HEADERS
    return 200, fleetpage.box_page(box_id, history, now), fleetpage.HEADERS
