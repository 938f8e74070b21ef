"""Config stage: rules.yaml as pydantic models, unknown keys refused (`schema`; the targets' kinds
in `targets`; durations, rates, booleans and URLs read strictly in `values`); read within bounds
with `${VAR}` substitution (`document`); `load_config` reports every problem at once as
FILE:LINE:COL with a plain fix (`load`, `crosscheck`, `messages`); `ConfigWatcher` swaps in a new
file only after it validates (`reload`).
"""

from bridge.config.listen import Listen, is_loopback
from bridge.config.load import check, load_config
from bridge.config.passwords import check_password, hash_password
from bridge.config.reload import ConfigWatcher
from bridge.config.schema import (
    Config,
    GroupConfig,
    PassthroughConfig,
    RuleConfig,
    ServerAuthConfig,
    ServerConfig,
    SourceConfig,
)
from bridge.config.targets import (
    AmqpTargetConfig,
    AppriseTargetConfig,
    BrokerTargetCommon,
    BrokerTargetConfig,
    ChatTargetCommon,
    DiscordTargetConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    RedisTargetConfig,
    SlackTargetConfig,
    TargetCommon,
    TargetConfig,
    WebhookTargetConfig,
)
from bridge.config.values import parse_duration, parse_rate
from bridge.errors import ConfigError, Problem

__all__ = [
    "AmqpTargetConfig",
    "AppriseTargetConfig",
    "BrokerTargetCommon",
    "BrokerTargetConfig",
    "ChatTargetCommon",
    "Config",
    "ConfigError",
    "ConfigWatcher",
    "DiscordTargetConfig",
    "GroupConfig",
    "Listen",
    "MqttTargetConfig",
    "NatsTargetConfig",
    "PassthroughConfig",
    "Problem",
    "RedisTargetConfig",
    "RuleConfig",
    "ServerAuthConfig",
    "ServerConfig",
    "SlackTargetConfig",
    "SourceConfig",
    "TargetCommon",
    "TargetConfig",
    "WebhookTargetConfig",
    "check",
    "check_password",
    "hash_password",
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_rate",
]
