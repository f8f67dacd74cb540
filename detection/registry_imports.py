"""Everything the detection extension registers with tf-models, in one import.

  import nse_tf_detection.registry_imports  # noqa: F401  (like official.vision.registry_imports)
"""

# pylint: disable=unused-import
from official.vision import registry_imports as _vision_registry_imports  # noqa: F401

from nse_tf_detection import bifpn  # noqa: F401  decoder 'bifpn'
from nse_tf_detection import efficientdet  # noqa: F401  experiments efficientdet_d0_*
from nse_tf_detection import mobilenet_head  # noqa: F401  backbone 'mobilenet_head'
from nse_tf_detection import nsenet_backbone  # noqa: F401  backbone 'nsenet'
from nse_tf_detection import task  # noqa: F401  task for EfficientDetTask configs
