"""The routing generation (SPEC §7): one row, bumped with every routing-relevant write.

No row is inserted here: the first bump creates it, and until then readers see generation 0.
"""

import uuid
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('experiments', '0004_version_key_fingerprint'),
    ]

    operations = [
        migrations.CreateModel(
            name='RoutingState',
            fields=[
                ('id', models.UUIDField(default=uuid.UUID('00000000-0000-0000-0000-000000000001'), editable=False, primary_key=True, serialize=False)),
                ('generation', models.BigIntegerField(default=0)),
                ('token', models.UUIDField(default=uuid.uuid4)),
            ],
            options={
                'db_table': 'model_experiment_routing_state',
                'constraints': [models.CheckConstraint(condition=models.Q(('id', uuid.UUID('00000000-0000-0000-0000-000000000001'))), name='model_experiment_routing_state_one_row')],
            },
        ),
    ]
