"""Config stage: rules.yaml as pydantic models (unknown keys refused), durations, rates and
booleans (`schema`); read within bounds with `${VAR}` substitution (`document`); `load_config`
reports every problem at once as FILE:LINE:COL with a plain fix (`load`, `crosscheck`,
`messages`); `ConfigWatcher` swaps in a new file only after it validates (`reload`).
"""

from bridge.config.listen import Listen, is_loopback
from bridge.config.load import check, load_config
from bridge.config.passwords import check_password, hash_password
from bridge.config.reload import ConfigWatcher
from bridge.config.schema import (
    AmqpTargetConfig,
    AppriseTargetConfig,
    BrokerTargetCommon,
    BrokerTargetConfig,
    ChatTargetCommon,
    Config,
    DiscordTargetConfig,
    GroupConfig,
    MqttTargetConfig,
    NatsTargetConfig,
    PassthroughConfig,
    RedisTargetConfig,
    RuleConfig,
    ServerAuthConfig,
    ServerConfig,
    SlackTargetConfig,
    SourceConfig,
    TargetCommon,
    TargetConfig,
    WebhookTargetConfig,
    parse_duration,
    parse_rate,
)
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
