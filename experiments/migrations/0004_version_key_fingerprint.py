"""Record which encryption key encrypted each checkpoint's partner key (a non-secret
fingerprint), and give reading prompts its own permission.

Existing rows get the fingerprint of the key this migration runs with, but only
where that key really decrypts them; the rest stay empty (unknown)."""

import json

from django.db import migrations, models

BATCH = 500


def backfill_fingerprints(apps, schema_editor):
    from experiments import crypto

    try:
        fingerprint = crypto.key_fingerprint()
    except crypto.EncryptionKeyError:
        return  # no usable key in this process: every fingerprint stays unknown
    versions = apps.get_model("experiments", "VariantVersion").objects
    verdicts: dict[str, bool] = {}  # hot-swaps reuse ciphertext: decrypt each one once
    decryptable = []
    for pk, envelope in versions.values_list("pk", "encrypted_api_key").iterator():
        seal = json.dumps(envelope, sort_keys=True)
        if seal not in verdicts:
            verdicts[seal] = isinstance(envelope, dict) and crypto.can_decrypt(envelope)
        if verdicts[seal]:
            decryptable.append(pk)
    for start in range(0, len(decryptable), BATCH):
        versions.filter(pk__in=decryptable[start : start + BATCH]).update(
            key_fingerprint=fingerprint
        )


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0003_request_measures_and_compact_subject"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="experiment",
            options={
                "ordering": ["-created_at"],
                "permissions": [
                    (
                        "transition_experiment",
                        "Can activate, pause, complete and archive experiments",
                    ),
                    ("view_prompt", "Can read the captured prompts of an experiment's requests"),
                ],
            },
        ),
        migrations.AddField(
            model_name="variantversion",
            name="key_fingerprint",
            field=models.CharField(blank=True, default="", max_length=16),
        ),
        migrations.RunPython(backfill_fingerprints, migrations.RunPython.noop),
    ]
