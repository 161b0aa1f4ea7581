from django.urls import path, re_path

from gateway import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/responses", views.responses, name="responses"),
    path("v1/messages", views.messages, name="messages"),
    path("v1/models", views.models, name="models"),
    path("v1/feedback", views.feedback, name="feedback"),
    # Last: every other path under /v1/ answers in the OpenAI error shape.
    re_path(r"^v1/", views.unknown_endpoint, name="unknown-endpoint"),
]
