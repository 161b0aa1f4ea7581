"""Partition the raw tables by month on PostgreSQL (SQLite keeps plain tables).

``gateway_usage`` and ``model_experiment_request`` by ``created_at``,
``model_experiment_checkpoint_message`` by ``month``; see experiments/partitions.py for
the keys and the foreign key this implies. Each table is recreated as a partitioned
table with the same columns, checks, indexes (same names) and foreign keys, a default
partition and one partition per month from the oldest row's month to three months
ahead, and its rows are copied over; attribution rows also get a BRIN index on
created_at (rollup rebuilds read them an hour at a time). Reversible: the reverse makes
plain tables again.
"""

from django.db import migrations

#: table -> (partition key, primary key columns when partitioned, plain primary key)
TABLES = {
    "gateway_usage": ("created_at", "id, created_at", "id"),
    "model_experiment_request": ("created_at", "usage_id, created_at", "usage_id"),
    "model_experiment_checkpoint_message": (
        "month",
        "month, variant_version_id, message_hash",
        "month, variant_version_id, message_hash",
    ),
}
#: Referencing tables first, so each can be dropped before what it references.
ORDER = ["model_experiment_request", "gateway_usage", "model_experiment_checkpoint_message"]
MONTHS_AHEAD = 3


def _definitions(cursor, table):
    """Index and foreign key definitions of ``table`` (not its primary key)."""
    cursor.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname NOT IN ("
        "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p')",
        [table, table],
    )
    indexes = [row[0] for row in cursor.fetchall()]
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'f' AND conparentid = 0",
        [table],
    )
    foreign_keys = cursor.fetchall()
    return indexes, foreign_keys


def _months(cursor, table, column):
    cursor.execute(f"SELECT min({column})::date, now()::date FROM {table}")
    oldest, today = cursor.fetchone()
    month = (oldest or today).replace(day=1)
    last = today.replace(day=1)
    for _ in range(MONTHS_AHEAD):
        last = last.replace(year=last.year + last.month // 12, month=last.month % 12 + 1)
    while month <= last:
        following = month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)
        yield month, following
        month = following


def _bound(month, column):
    return month.isoformat() if column == "month" else f"{month.isoformat()} 00:00:00+00"


def _rebuild(schema_editor, *, partitioned):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        saved = {}
        for table in ORDER:
            saved[table] = _definitions(cursor, table)
            cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
        for table in reversed(ORDER):
            column, partitioned_key, plain_key = TABLES[table]
            like = f"(LIKE {table}_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            if partitioned:
                cursor.execute(f"CREATE TABLE {table} {like} PARTITION BY RANGE ({column})")
                cursor.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
                for month, following in _months(cursor, f"{table}_old", column):
                    cursor.execute(
                        f"CREATE TABLE {table}_p{month:%Y%m} PARTITION OF {table} FOR VALUES "
                        f"FROM ('{_bound(month, column)}') TO ('{_bound(following, column)}')"
                    )
            else:
                cursor.execute(f"CREATE TABLE {table} {like}")
            cursor.execute(f"INSERT INTO {table} SELECT * FROM {table}_old")
        for table in ORDER:
            cursor.execute(f"DROP TABLE {table}_old CASCADE")
        for table in reversed(ORDER):
            column, partitioned_key, plain_key = TABLES[table]
            key = partitioned_key if partitioned else plain_key
            cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({key})")
            indexes, foreign_keys = saved[table]
            for definition in indexes:
                cursor.execute(definition.replace(f"{table}_old", table))
            for name, definition in foreign_keys:
                if "REFERENCES gateway_usage" in definition:
                    # Attribution -> usage: the usage key includes created_at when partitioned.
                    definition = (
                        "FOREIGN KEY (usage_id, created_at) REFERENCES gateway_usage(id, created_at) "
                        "DEFERRABLE INITIALLY DEFERRED"
                        if partitioned
                        else "FOREIGN KEY (usage_id) REFERENCES gateway_usage(id) "
                        "DEFERRABLE INITIALLY DEFERRED"
                    )
                cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        if partitioned:
            # Rollup rebuilds read an hour of attribution rows at a time: a BRIN index on
            # created_at (rows land in time order) finds them for a few kB of index.
            cursor.execute(
                "CREATE INDEX IF NOT EXISTS mx_request_created_brin "
                "ON model_experiment_request USING brin (created_at)"
            )


def partition(apps, schema_editor):
    _rebuild(schema_editor, partitioned=True)


def unpartition(apps, schema_editor):
    _rebuild(schema_editor, partitioned=False)


class Migration(migrations.Migration):
    atomic = True

    dependencies = [
        ("experiments", "0006_rollups"),
        ("gateway", "0001_initial"),
    ]

    operations = [migrations.RunPython(partition, unpartition)]
