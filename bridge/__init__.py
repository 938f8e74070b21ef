"""mj-bridge: watches Midjourney task APIs and tells: every task change becomes one event, routed
by rules.yaml to signed webhooks and to chat, email and 100+ services through apprise."""

__version__ = "0.1.0"
