from .config import CfgNode, ConfigError, add_scrl_config, configurable, get_cfg

__all__ = ["CfgNode", "ConfigError", "add_scrl_config", "configurable", "get_cfg"]
