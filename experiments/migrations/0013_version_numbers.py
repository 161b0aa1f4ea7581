"""Number every slot's checkpoints (SPEC §10): ``rc1 v1``, ``rc1 v2``, key rotations ``v2.1``.

Existing versions are numbered in effective order per slot, by the rule new inserts
follow (``experiments.models.is_key_rotation``, copied here so that this migration keeps
meaning what it meant): the same upstream under a new key is a key rotation of the
version before it, anything else the slot's next number. The ciphertexts are compared,
never decrypted: a new key always gets a fresh IV.
"""

from django.db import migrations, models
from django.db.models import Q


def is_key_rotation(previous: dict, upstream, encrypted_api_key) -> bool:
    return previous["upstream"] == upstream and previous["encrypted_api_key"] != encrypted_api_key


def number_versions(apps, schema_editor):
    VariantVersion = apps.get_model("experiments", "VariantVersion")
    rows = VariantVersion.objects.order_by("variant_id", "effective_at", "id").only(
        "id", "variant_id", "upstream", "encrypted_api_key"
    )
    numbered, previous, highest, rotations = [], None, 0, 0
    for row in rows.iterator(chunk_size=500):
        current = {"upstream": row.upstream, "encrypted_api_key": row.encrypted_api_key}
        if previous is None or previous[0] != row.variant_id:
            highest, rotations = 1, 0
        elif is_key_rotation(previous[1], row.upstream, row.encrypted_api_key):
            rotations += 1
        else:
            highest, rotations = highest + 1, 0
        row.version_number, row.key_rotation = highest, rotations
        numbered.append(row)
        previous = (row.variant_id, current)
    VariantVersion.objects.bulk_update(numbered, ["version_number", "key_rotation"], batch_size=500)


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0012_control_slot"),
    ]

    operations = [
        migrations.AddField(
            model_name="variantversion",
            name="version_number",
            field=models.PositiveIntegerField(null=True),
        ),
        migrations.AddField(
            model_name="variantversion",
            name="key_rotation",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(number_versions, migrations.RunPython.noop, elidable=False),
        migrations.AlterField(
            model_name="variantversion",
            name="version_number",
            field=models.PositiveIntegerField(),
        ),
        migrations.AddConstraint(
            model_name="variantversion",
            constraint=models.UniqueConstraint(
                fields=("variant", "version_number", "key_rotation"),
                name="model_experiment_variant_version_unique_number",
            ),
        ),
        migrations.AddConstraint(
            model_name="variantversion",
            constraint=models.CheckConstraint(
                condition=Q(version_number__gte=1),
                name="model_experiment_variant_version_number_positive",
            ),
        ),
    ]
