"""strongreid: the Bag of Tricks strong baseline for re-identification, end to end."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FeatureExtractor", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import strongreid` stays cheap for the CLI and the config tools.
    if name == "FeatureExtractor":
        from strongreid.deploy.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'strongreid' has no attribute {name!r}")
