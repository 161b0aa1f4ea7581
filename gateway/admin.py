"""Gateway tokens in the admin: issued once (shown once, with a copy button), revoked
through the same service as ``manage.py gateway_token``; never shown again, nor their hash."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from gateway.models import GatewayToken
from gateway.tokens import TokenError, create_token, revoke_token


class TokenCreationForm(forms.Form):
    user = forms.ModelChoiceField(
        queryset=get_user_model().objects.filter(is_active=True).order_by("username"),
        help_text="Requests with this token are recorded as this user's, and bucketed by user.",
    )
    name = forms.CharField(
        required=False, max_length=100, help_text="What it is for, e.g. “laptop” or “CI”."
    )


@admin.register(GatewayToken)
class GatewayTokenAdmin(admin.ModelAdmin):
    list_display = ("token_prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("token_prefix", "name", "user__username")
    # The hash stays out of the page too: it is enough to check a guessed token offline.
    fields = ("token_prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ("revoke",)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # revoked tokens stay, so usage rows keep naming who used them

    def get_urls(self):
        own = [
            path(
                "<path:object_id>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="gateway_gatewaytoken_revoke",
            )
        ]
        return own + super().get_urls()

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context=None):
        """Issue a token and show it on this one response; it is never shown again."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = TokenCreationForm(
            request.POST if request.method == "POST" else None,
            initial={"user": request.GET.get("user")},
        )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Add gateway token",
            "form": form,
        }
        if request.method == "POST" and form.is_valid():
            try:
                row, plaintext = create_token(
                    user=form.cleaned_data["user"],
                    name=form.cleaned_data["name"],
                    by=request.user,
                )
            except TokenError as refused:
                form.add_error(None, str(refused))
            else:
                # admin_view marks every admin page never_cache (no-store), this one included.
                context.update(title="Gateway token created", token=row, plaintext=plaintext)
                return TemplateResponse(
                    request, "admin/gateway/gatewaytoken/token_created.html", context
                )
        return TemplateResponse(request, "admin/gateway/gatewaytoken/add_token.html", context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        token = self.get_object(request, unquote(object_id))
        extra_context = {
            **(extra_context or {}),
            "revoke_url": reverse("admin:gateway_gatewaytoken_revoke", args=[token.pk])
            if token is not None
            and token.revoked_at is None
            and self.has_change_permission(request, token)
            else "",
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def revoke_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Confirm, then revoke through ``gateway.tokens.revoke_token``."""
        token = self.get_object(request, unquote(object_id))
        if token is None:
            raise Http404
        if not self.has_change_permission(request, token):
            raise PermissionDenied
        detail = reverse("admin:gateway_gatewaytoken_change", args=[token.pk])
        if request.method == "POST":
            revoke_token(token=token, by=request.user)
            self.message_user(request, f"Revoked token {token}.", messages.SUCCESS)
            return HttpResponseRedirect(detail)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Revoke token {token.token_prefix}…?",
            "token": token,
            "cancel_url": detail,
        }
        return TemplateResponse(request, "admin/gateway/gatewaytoken/revoke.html", context)

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset) -> None:
        tokens = list(queryset.filter(revoked_at__isnull=True))
        for token in tokens:
            revoke_token(token=token, by=request.user)
        self.message_user(request, f"Revoked {len(tokens)} token(s).", messages.SUCCESS)
