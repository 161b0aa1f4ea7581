"""Gateway tokens in the admin: read-only, revocable, never shown in plaintext."""

from django.contrib import admin, messages
from django.utils import timezone

from gateway.models import GatewayToken


@admin.register(GatewayToken)
class GatewayTokenAdmin(admin.ModelAdmin):
    list_display = ("token_prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("token_prefix", "name", "user__username")
    # The hash stays out of the page too: it is enough to check a guessed token offline.
    fields = ("token_prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ("revoke",)

    def has_add_permission(self, request) -> bool:
        # Tokens are issued by `manage.py gateway_token create`, which shows them once.
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)
