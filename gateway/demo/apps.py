from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "gateway.demo"
    label = "gateway_demo"
    verbose_name = "Demo"
