from .config import CfgNode, ConfigError, add_scrl_config, check_config, configurable, get_cfg

__all__ = ["CfgNode", "ConfigError", "add_scrl_config", "check_config", "configurable", "get_cfg"]
