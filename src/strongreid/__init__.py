"""strongreid: the Bag of Tricks strong baseline for re-identification, end to end."""

from __future__ import annotations

from strongreid.config.components import set_component_loader as _set_component_loader

__version__ = "0.1.0"

__all__ = ["FeatureExtractor", "__version__"]


def _import_components() -> None:
    """Import the built-in components that own config keys, so their registries and checks exist.

    The package root is where the parts meet: the config (the lowest layer) calls this through
    `config.components.load_components()` before it merges or validates a config, and never
    names a component itself. A user's own component registers when the user's module is
    imported, before the config that names it is loaded.
    """
    import strongreid.data.build
    import strongreid.data.datasets
    import strongreid.data.transforms
    import strongreid.engine.runtime
    import strongreid.evaluation.protocol
    import strongreid.losses
    import strongreid.modeling
    import strongreid.solver  # noqa: F401


_set_component_loader(_import_components)


def __getattr__(name: str):
    # Imported lazily so that `import strongreid` stays cheap for the CLI and the config tools.
    if name == "FeatureExtractor":
        from strongreid.deploy.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'strongreid' has no attribute {name!r}")
