"""Configuration: a TOML file, overridden by ``OPERA_CONSUMER_…`` environment variables, with
secrets also readable from files (systemd credentials, Docker secrets).

* :mod:`.settings`: the models, one per table; unknown keys are errors.
* :mod:`.fields`: URLs and headers checked as hostile input, and masked where shown.
* :mod:`.loading`: finding and loading the file; errors that name the key and the fix.
* :mod:`.secrets`: every secret the settings hold, in every form it may travel in.
"""

from __future__ import annotations

from .fields import is_loopback, mask_url
from .loading import DEFAULT_CONFIG_PATHS, effective, explain, find_config, load_settings
from .secrets import (
    NatsCredentials,
    nats_credentials,
    query_secret_values,
    secret_values,
    url_secret_values,
    webhook_secret_values,
)
from .settings import (
    ENV_PREFIX,
    AuthSettings,
    ConnectionSettings,
    FilterSettings,
    FleetSettings,
    HttpSettings,
    JsonlSinkSettings,
    LogSettings,
    MetricsSettings,
    NatsSinkSettings,
    OrchestrationSettings,
    PipelineSettings,
    PostgresSinkSettings,
    PythonSinkSettings,
    RedisSinkSettings,
    Settings,
    SinkSettings,
    SqliteSinkSettings,
    StateSettings,
    StreamSettings,
    SubscriptionSettings,
    WebhookSinkSettings,
    is_async_callable,
    resolve,
)

__all__ = [
    "DEFAULT_CONFIG_PATHS",
    "ENV_PREFIX",
    "AuthSettings",
    "ConnectionSettings",
    "FilterSettings",
    "FleetSettings",
    "HttpSettings",
    "JsonlSinkSettings",
    "LogSettings",
    "MetricsSettings",
    "NatsCredentials",
    "NatsSinkSettings",
    "OrchestrationSettings",
    "PipelineSettings",
    "PostgresSinkSettings",
    "PythonSinkSettings",
    "RedisSinkSettings",
    "Settings",
    "SinkSettings",
    "SqliteSinkSettings",
    "StateSettings",
    "StreamSettings",
    "SubscriptionSettings",
    "WebhookSinkSettings",
    "effective",
    "explain",
    "find_config",
    "is_async_callable",
    "is_loopback",
    "load_settings",
    "mask_url",
    "nats_credentials",
    "query_secret_values",
    "resolve",
    "secret_values",
    "url_secret_values",
    "webhook_secret_values",
]
