"""Using a trained model: `FeatureExtractor`, `strongreid extract` and `strongreid export`."""

from strongreid.deploy.export import (
    InferenceModel,
    build_inference_model,
    export_command,
    export_model,
)
from strongreid.deploy.extractor import (
    FeatureExtractor,
    extract_command,
    list_images,
    load_inference_model,
    parse_pid_camid,
    read_checkpoint_info,
    write_features,
)

__all__ = [
    "FeatureExtractor",
    "InferenceModel",
    "build_inference_model",
    "export_command",
    "export_model",
    "extract_command",
    "list_images",
    "load_inference_model",
    "parse_pid_camid",
    "read_checkpoint_info",
    "write_features",
]
