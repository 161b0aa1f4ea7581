"""Rollups that reports read (SPEC §10), and the error kind copied onto attribution rows
so the rollups can be rebuilt from the attribution table alone.

Existing deployments: run ``manage.py rollups rebuild`` once after this migration; until
then reports count only the requests written since.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('experiments', '0005_routing_state'),
        ('gateway', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='experimentrequest',
            name='error_kind',
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.RunSQL(
            # Correlated subquery: the same statement on PostgreSQL and SQLite.
            """
            UPDATE model_experiment_request SET error_kind = (
                SELECT u.error_kind FROM gateway_usage u
                WHERE u.id = model_experiment_request.usage_id
            ) WHERE has_error
            """,
            migrations.RunSQL.noop,
        ),
        migrations.CreateModel(
            name='CheckpointMessage',
            fields=[
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('first_seen_at', models.DateTimeField()),
                ('previous_first_seen_at', models.DateTimeField(null=True)),
                ('previous_allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16, null=True)),
                ('pk', models.CompositePrimaryKey('month', 'variant_version', 'message_hash', blank=True, editable=False, primary_key=True, serialize=False)),
                ('month', models.DateField()),
                ('message_hash', models.UUIDField()),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_checkpoint_message',
            },
        ),
        migrations.CreateModel(
            name='CheckpointSubject',
            fields=[
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('first_seen_at', models.DateTimeField()),
                ('previous_first_seen_at', models.DateTimeField(null=True)),
                ('previous_allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16, null=True)),
                ('pk', models.CompositePrimaryKey('variant_version', 'subject_hash', blank=True, editable=False, primary_key=True, serialize=False)),
                ('subject_hash', models.UUIDField()),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_checkpoint_subject',
            },
        ),
        migrations.CreateModel(
            name='ErrorKindRollup',
            fields=[
                ('writer', models.IntegerField()),
                ('resolution', models.IntegerField(choices=[(60, 'minute'), (3600, 'hour'), (86400, 'day'), (0, 'all time')])),
                ('bucket', models.BigIntegerField()),
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('pk', models.CompositePrimaryKey('variant_version', 'resolution', 'bucket', 'allocation_subject', 'error_kind', 'writer', blank=True, editable=False, primary_key=True, serialize=False)),
                ('error_kind', models.CharField(max_length=64)),
                ('count', models.BigIntegerField(default=0)),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_rollup_error',
            },
        ),
        migrations.CreateModel(
            name='LatencyBin',
            fields=[
                ('writer', models.IntegerField()),
                ('resolution', models.IntegerField(choices=[(60, 'minute'), (3600, 'hour'), (86400, 'day'), (0, 'all time')])),
                ('bucket', models.BigIntegerField()),
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('pk', models.CompositePrimaryKey('variant_version', 'resolution', 'bucket', 'allocation_subject', 'metric', 'key', 'writer', blank=True, editable=False, primary_key=True, serialize=False)),
                ('metric', models.SmallIntegerField(choices=[(1, 'time to first byte (ms)'), (2, 'total latency (ms)'), (3, 'output tokens per second after the first byte')])),
                ('key', models.IntegerField()),
                ('count', models.BigIntegerField(default=0)),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_rollup_bin',
            },
        ),
        migrations.CreateModel(
            name='RequestRollup',
            fields=[
                ('writer', models.IntegerField()),
                ('resolution', models.IntegerField(choices=[(60, 'minute'), (3600, 'hour'), (86400, 'day'), (0, 'all time')])),
                ('bucket', models.BigIntegerField()),
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('pk', models.CompositePrimaryKey('variant_version', 'resolution', 'bucket', 'allocation_subject', 'writer', blank=True, editable=False, primary_key=True, serialize=False)),
                ('requests', models.BigIntegerField(default=0)),
                ('errors', models.BigIntegerField(default=0)),
                ('streamed', models.BigIntegerField(default=0)),
                ('status_2xx', models.BigIntegerField(default=0)),
                ('status_3xx', models.BigIntegerField(default=0)),
                ('status_4xx', models.BigIntegerField(default=0)),
                ('status_5xx', models.BigIntegerField(default=0)),
                ('status_other', models.BigIntegerField(default=0)),
                ('input_tokens', models.BigIntegerField(default=0)),
                ('output_tokens', models.BigIntegerField(default=0)),
                ('total_ms_samples', models.BigIntegerField(default=0)),
                ('total_ms_sum', models.BigIntegerField(default=0)),
                ('total_ms_sum_squares', models.DecimalField(decimal_places=0, default=0, max_digits=38)),
                ('new_subjects', models.BigIntegerField(default=0)),
                ('new_slot_subjects', models.BigIntegerField(default=0)),
                ('new_messages', models.BigIntegerField(default=0)),
                ('first_request_at', models.DateTimeField(null=True)),
                ('last_request_at', models.DateTimeField(null=True)),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_rollup',
            },
        ),
        migrations.CreateModel(
            name='SlotSubject',
            fields=[
                ('allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16)),
                ('first_seen_at', models.DateTimeField()),
                ('previous_first_seen_at', models.DateTimeField(null=True)),
                ('previous_allocation_subject', models.CharField(choices=[('user', 'User'), ('machine', 'Machine'), ('ip', 'IP address')], max_length=16, null=True)),
                ('pk', models.CompositePrimaryKey('variant', 'subject_hash', blank=True, editable=False, primary_key=True, serialize=False)),
                ('subject_hash', models.UUIDField()),
                ('previous_variant_version', models.ForeignKey(db_index=False, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
                ('variant', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variant')),
                ('variant_version', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='experiments.variantversion')),
            ],
            options={
                'db_table': 'model_experiment_slot_subject',
            },
        ),
    ]
