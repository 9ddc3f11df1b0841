"""Learning from a user's own footage without identity labels (pseudo-identities by clustering).

ADAPT.ENABLED (configs/adapt_night.yml, docs/adaptation.md): `AdaptTrainer` hides the training
split's identities, `PseudoLabelHook` clusters every training image's feature before each epoch,
and the metric term 'cluster_memory' (strongreid.losses.cluster_memory) trains against the
cluster centroids.
"""

from strongreid.adapt.clustering import pseudo_labels
from strongreid.adapt.hooks import PseudoLabelHook
from strongreid.adapt.loader import PseudoIdentityLoader
from strongreid.adapt.trainer import AdaptTrainer, tracklet_groups

__all__ = ["AdaptTrainer", "PseudoIdentityLoader", "PseudoLabelHook", "pseudo_labels", "tracklet_groups"]
