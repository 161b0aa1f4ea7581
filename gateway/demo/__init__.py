"""The demo: a local partner upstream and ``manage.py demo``, apart from production code.

An app of its own (label ``gateway_demo``) so its commands sit with it.
"""
