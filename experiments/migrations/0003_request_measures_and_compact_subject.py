"""Reports read one table: copy the usage measures onto attribution rows, store the
subject pseudonym as 16 bytes, and add the covering indexes the stats page and the
request browser scan (bench/bench_reports.py has the before/after figures)."""

import hashlib
import uuid

from django.db import migrations, models

MEASURES = (
    "status_code",
    "has_error",
    "is_stream",
    "input_tokens",
    "output_tokens",
    "ttfb_ms",
    "total_ms",
)

# Rows written before the gateway filled the subject pseudonym: for a user
# subject it can be rebuilt from the usage row (seed = model_exp_{experiment}_user_{id},
# SPEC §7); machine ids and IPs were never stored, so those rows stay without one.
BACKFILL_POSTGRES = """
UPDATE model_experiment_request AS r
SET {copies},
    allocation_subject_hash = COALESCE(
        r.allocation_subject_hash,
        CASE WHEN r.allocation_subject = 'user' AND u.user_id IS NOT NULL THEN
            substr(encode(sha256(convert_to(
                'model_exp_' || lower(v.experiment_id::text) || '_user_' || u.user_id::text,
                'UTF8')), 'hex'), 1, 32)::uuid
        END)
FROM gateway_usage AS u, model_experiment_variant_version AS vv, model_experiment_variant AS v
WHERE u.id = r.usage_id AND vv.id = r.variant_version_id AND v.id = vv.variant_id
""".format(copies=", ".join(f"{name} = u.{name}" for name in MEASURES))


def _fire_deferred_checks(schema_editor):
    """Run the deferred foreign-key checks the UPDATE queued, now.

    PostgreSQL refuses to ALTER or index a table with pending trigger events in
    the same transaction, and this migration does both after updating rows.
    """
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def shorten_hex_hashes(apps, schema_editor):
    """64 hex chars -> their first 32, which both backends read as a uuid."""
    schema_editor.execute(
        "UPDATE model_experiment_request SET allocation_subject_hash = "
        "substr(allocation_subject_hash, 1, 32) WHERE allocation_subject_hash IS NOT NULL"
    )
    _fire_deferred_checks(schema_editor)


def backfill(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKFILL_POSTGRES)
        _fire_deferred_checks(schema_editor)
        return
    ExperimentRequest = apps.get_model("experiments", "ExperimentRequest")
    rows = ExperimentRequest.objects.select_related("usage", "variant_version__variant")
    for row in rows.iterator():
        for name in MEASURES:
            setattr(row, name, getattr(row.usage, name))
        if (
            row.allocation_subject_hash is None
            and row.allocation_subject == "user"
            and row.usage.user_id is not None
        ):
            experiment_id = str(row.variant_version.variant.experiment_id).lower()
            seed = f"model_exp_{experiment_id}_user_{row.usage.user_id}"
            digest = hashlib.sha256(seed.encode("utf-8")).digest()
            row.allocation_subject_hash = uuid.UUID(bytes=digest[:16])
        row.save(update_fields=[*MEASURES, "allocation_subject_hash"])


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0002_request_subject_hash"),
        ("gateway", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(shorten_hex_hashes, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="experimentrequest",
            name="allocation_subject_hash",
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="status_code",
            field=models.PositiveSmallIntegerField(default=0),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="has_error",
            field=models.BooleanField(default=False),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="is_stream",
            field=models.BooleanField(default=False),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="input_tokens",
            field=models.PositiveIntegerField(default=0),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="output_tokens",
            field=models.PositiveIntegerField(default=0),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="ttfb_ms",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="experimentrequest",
            name="total_ms",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
        migrations.RemoveIndex(
            model_name="experimentrequest",
            name="mx_request_version_created",
        ),
        migrations.AddIndex(
            model_name="experimentrequest",
            index=models.Index(
                fields=["variant_version", "created_at"],
                include=(
                    "allocation_subject",
                    "has_error",
                    "input_tokens",
                    "output_tokens",
                    "ttfb_ms",
                    "total_ms",
                ),
                name="mx_request_version_measures",
            ),
        ),
        migrations.AddIndex(
            model_name="experimentrequest",
            index=models.Index(
                fields=["variant_version", "allocation_subject_hash"],
                include=("created_at", "allocation_subject"),
                name="mx_request_version_subject",
            ),
        ),
        migrations.AddIndex(
            model_name="experimentrequest",
            index=models.Index(
                condition=models.Q(("client_request_id__isnull", False)),
                fields=["variant_version", "client_request_id"],
                include=("created_at", "allocation_subject"),
                name="mx_request_version_message",
            ),
        ),
        migrations.AddIndex(
            model_name="experimentrequest",
            index=models.Index(
                condition=models.Q(("has_error", True)),
                fields=["variant_version", "-created_at", "-usage"],
                name="mx_request_version_errors",
            ),
        ),
    ]
