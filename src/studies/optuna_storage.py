"""Optuna's storage for a study shared by many workers: opening it with heartbeats, hiding its
password in messages, and following a re-queued trial back to the one it continues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.util.errors import LoralabError

RESUME_OF = "loralab_resume_of"  # user attr of a trial re-queued after Ctrl-C: the trial it continues


def import_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # loralab prints one line per trial itself
    return optuna


def masked_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def open_storage(tc) -> Any:
    """Optuna's RDB storage with heartbeats: a trial whose worker stops beating for
    `grace_seconds` is marked FAIL and re-queued with the same params (up to `max_retries`); their
    ranges are checked with the rest of the config (TuneConfig.check_ranges)."""
    import_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = tc.storage
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgresql") else {}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=tc.heartbeat_seconds,
            grace_period=tc.grace_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tc.max_retries),
        )
    except Exception as exc:  # SQLAlchemy, the DB driver and Optuna each raise their own types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoralabError(f"tune.storage={masked_url(url)}: cannot open it ({reason})") from None


def continued_trial(frozen) -> int | None:
    """The trial whose checkpoint this one continues: re-queued after Ctrl-C, or after its worker died."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    return frozen.user_attrs.get(RESUME_OF, RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen))
