from .config import CfgNode, ConfigError, add_scrl_config, check_config, config_from_args, configurable, get_cfg

__all__ = ["CfgNode", "ConfigError", "add_scrl_config", "check_config", "config_from_args", "configurable", "get_cfg"]
