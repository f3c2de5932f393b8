"""Compose the unified config from `conf/` against the registered schema, as Hydra does for a job."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides=(), *, config_dir: str | None = None, config_name: str = "config", with_hydra: bool = False):
    """The job config for `overrides` (and Hydra's own node with `with_hydra`). `config_dir`, as `--config-dir`,
    holds the primary config; conf/ stays on the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from unified_train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    search = [f"hydra.searchpath=[file://{CONF_DIR}]"] if config_dir else []
    with initialize_config_dir(config_dir=config_dir or CONF_DIR, version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=list(overrides) + search, return_hydra_config=with_hydra
        )
