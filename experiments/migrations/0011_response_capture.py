"""Response capture (SPEC §9): a per-experiment sampling rate, and the answer's hash next
to the prompt's on attribution rows.

On PostgreSQL model_experiment_request is partitioned (0007): ADD COLUMN, the check and
the partial index are declared on the parent and PostgreSQL applies them to every
partition (and to partitions created later). The new column is nullable with no
default, so adding it rewrites no partition. The rate has a database default (0) so a
process of the previous release can still create experiments during a rolling deploy.
"""

import django.core.validators
from decimal import Decimal
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('experiments', '0010_quality_signals'),
        ('gateway', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='experiment',
            name='response_capture_rate',
            field=models.DecimalField(db_default=Decimal('0'), decimal_places=2, default=Decimal('0'), help_text='Percent of requests whose answer is captured (0 to 100; 0 = none).', max_digits=5, validators=[django.core.validators.MinValueValidator(0), django.core.validators.MaxValueValidator(100)]),
        ),
        migrations.AddField(
            model_name='experimentrequest',
            name='response_sha256',
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.AddIndex(
            model_name='experimentrequest',
            index=models.Index(condition=models.Q(('response_sha256__isnull', False)), fields=['request_body_sha256', '-created_at'], include=('variant_version', 'response_sha256'), name='mx_request_prompt_answered'),
        ),
        migrations.AddConstraint(
            model_name='experiment',
            constraint=models.CheckConstraint(condition=models.Q(('response_capture_rate__gte', 0), ('response_capture_rate__lte', 100)), name='model_experiment_response_capture_rate_range'),
        ),
        migrations.AddConstraint(
            model_name='experimentrequest',
            constraint=models.CheckConstraint(condition=models.Q(('response_sha256__isnull', True), ('response_sha256__regex', '^[0-9a-f]{64}$'), ('response_sha256__in', ['__failed__', '__deleted__']), _connector='OR'), name='model_experiment_request_response_sha256_valid'),
        ),
    ]
