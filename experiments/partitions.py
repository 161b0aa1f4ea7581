"""Monthly partitions of the raw tables on PostgreSQL, and retention by whole months.

``gateway_usage`` and ``model_experiment_request`` are partitioned by ``created_at``
and ``model_experiment_checkpoint_message`` by ``month`` (migration 0007): one
partition per calendar month (UTC), ``<table>_pYYYYMM``, plus ``<table>_default``,
which catches a row no monthly partition covers, so a writer never fails for want of
a partition. ``ensure_partitions`` creates the coming months ahead (run it daily, or
let ``retention apply`` do it); it leaves a month alone while the default partition
holds rows of it (they stay there, still counted and still readable).

The primary keys include the partition key, as PostgreSQL requires: usage rows are
keyed (id, created_at), attribution rows (usage_id, created_at), and the attribution
row's foreign key to its usage row is (usage_id, created_at) -> (id, created_at), the
two being equal by SPEC §2. Django still sees ``usage_id`` alone as the key; ids are
UUIDs, so they stay unique.

Retention drops whole months older than the cutoff: the attribution partition first,
then the usage partition (detached first: the foreign key checks no row still
points into it), then that month's client-request-id partition. Rollups and the
first-seen subject tables are untouched, so reports, the SRM and every count stay as
they were. On SQLite (plain tables) the same rows are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

from experiments.models import CheckpointMessage, ExperimentRequest

#: How many months ahead of the current one ``ensure_partitions`` creates by default.
MONTHS_AHEAD = 3


def _usage_table() -> str:
    # Through the attribution row's foreign key: experiments never imports gateway.
    return ExperimentRequest._meta.get_field("usage").related_model._meta.db_table


def partitioned_tables() -> dict[str, str]:
    """Table -> partition key column, in the order partitions are dropped."""
    return {
        ExperimentRequest._meta.db_table: "created_at",
        _usage_table(): "created_at",
        CheckpointMessage._meta.db_table: "month",
    }


def month_start(moment: date | datetime) -> date:
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def partition_name(table: str, month: date) -> str:
    return f"{table}_p{month:%Y%m}"


def _bound(month: date, column: str) -> str:
    return month.isoformat() if column == "month" else f"{month.isoformat()} 00:00:00+00"


def existing_partitions(table: str) -> dict[date, str]:
    """Monthly partitions of ``table`` (month -> partition name), on PostgreSQL."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
            [table],
        )
        names = [name for (name,) in cursor.fetchall()]
    months = {}
    prefix = f"{table}_p"
    for name in names:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and len(suffix) == 6 and suffix.isdigit():
            months[date(int(suffix[:4]), int(suffix[4:]), 1)] = name
    return months


@dataclass
class EnsureResult:
    created: list[str] = field(default_factory=list)
    #: Months left to the default partition because it holds rows of them.
    held_in_default: list[str] = field(default_factory=list)


def ensure_partitions(
    *, first_month: date | None = None, months_ahead: int = MONTHS_AHEAD, today: date | None = None
) -> EnsureResult:
    """Create the monthly partitions from ``first_month`` (default: this month) to
    ``months_ahead`` months after this one. A no-op on SQLite."""
    result = EnsureResult()
    if connection.vendor != "postgresql":
        return result
    today = today or timezone.now().astimezone(UTC).date()
    last = month_start(today)
    for _ in range(months_ahead):
        last = next_month(last)
    for table, column in partitioned_tables().items():
        present = existing_partitions(table)
        month = month_start(first_month or today)
        while month <= last:
            if month not in present:
                _create_partition(table, column, month, result)
            month = next_month(month)
    return result


def _create_partition(table: str, column: str, month: date, result: EnsureResult) -> None:
    name = partition_name(table, month)
    low, high = _bound(month, column), _bound(next_month(month), column)
    with transaction.atomic(), connection.cursor() as cursor:
        # DDL on a table refuses to run while deferred checks on it are pending.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        # Interpolated: table and partition names we built, and ISO dates.
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {table}_default "  # noqa: S608
            f"WHERE {column} >= %s AND {column} < %s)",
            [low, high],
        )
        if cursor.fetchone()[0]:
            result.held_in_default.append(name)
            return
        cursor.execute(
            f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{low}') TO ('{high}')"
        )
    result.created.append(name)


# --- retention ------------------------------------------------------------------------


@dataclass
class RetentionPlan:
    cutoff: datetime
    #: Whole months older than the cutoff, oldest first: (partition names, estimated rows).
    partitions: list[tuple[str, int]] = field(default_factory=list)
    #: Rows older than the cutoff outside any dropped partition (default partition, or
    #: every table on SQLite), deleted row by row.
    loose_rows: int = 0


def retention_cutoff(older_than_days: int, now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(days=older_than_days)


def plan_retention(cutoff: datetime) -> RetentionPlan:
    """What ``apply_retention`` would remove: months wholly older than ``cutoff``."""
    plan = RetentionPlan(cutoff=cutoff)
    tables = partitioned_tables()
    if connection.vendor == "postgresql":
        for table in tables:
            for month, name in sorted(existing_partitions(table).items()):
                if next_month(month) <= cutoff.astimezone(UTC).date():
                    plan.partitions.append((name, _estimated_rows(name)))
    for table, column in tables.items():
        source = f"{table}_default" if connection.vendor == "postgresql" else table
        plan.loose_rows += _count_older(source, column, cutoff)
    return plan


def _estimated_rows(name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE relname = %s", [name]
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _older(column: str, cutoff: datetime) -> tuple[str, list]:
    if column == "month":
        # A month's row goes once the whole month is older than the cutoff.
        return f"{column} < %s", [month_start(cutoff.astimezone(UTC))]
    return f"{column} < %s", [cutoff]


def _count_older(table: str, column: str, cutoff: datetime) -> int:
    condition, params = _older(column, cutoff)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} WHERE {condition}", params)  # noqa: S608
        return cursor.fetchone()[0]


def apply_retention(plan: RetentionPlan) -> None:
    """Drop the plan's partitions and delete its loose rows (attribution before usage)."""
    usage = _usage_table()
    with transaction.atomic(), connection.cursor() as cursor:
        if plan.partitions:
            # DDL on a table refuses to run while deferred checks on it are pending.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        for name, _ in plan.partitions:
            if name.startswith(f"{usage}_p"):
                # Detaching checks that no attribution row still points into it.
                cursor.execute(f"ALTER TABLE {usage} DETACH PARTITION {name}")
            cursor.execute(f"DROP TABLE {name}")
        for table, column in partitioned_tables().items():
            source = f"{table}_default" if connection.vendor == "postgresql" else table
            condition, params = _older(column, plan.cutoff)
            cursor.execute(f"DELETE FROM {source} WHERE {condition}", params)  # noqa: S608
