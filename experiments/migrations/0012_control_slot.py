from django.db import migrations, models


class Migration(migrations.Migration):
    """A control slot per experiment: the slot every comparison is made against.

    Nothing is marked on existing experiments: with no slot marked the first-created slot
    is the control, which is what an unmarked experiment has always meant.
    """

    dependencies = [
        ("experiments", "0011_response_capture"),
    ]

    operations = [
        migrations.AddField(
            model_name="variant",
            name="is_control",
            field=models.BooleanField(default=False),
        ),
        migrations.AddConstraint(
            model_name="variant",
            constraint=models.UniqueConstraint(
                condition=models.Q(("is_control", True)),
                fields=("experiment",),
                name="model_experiment_variant_one_control",
            ),
        ),
    ]
