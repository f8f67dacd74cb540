"""EfficientDet-D0 on tf-models vision with NSENet backbones.

A tf-models extension, not a parallel framework: importing
`nse_tf_detection.registry_imports` registers

* the `nsenet` backbone (`backbones/factory.py`), levels 3-5 of an NSENet built from
  a released name or an Architecture JSON, optionally initialised from a retrain run;
* the `bifpn` decoder (`decoders/factory.py`), EfficientDet's BiFPN;
* the experiments `efficientdet_d0_nsenet_coco`, `efficientdet_d0_efficientnetb0_coco`
  and `efficientdet_d0_mobilenetv2_coco` (`exp_factory`), which use tf-models'
  RetinaNet task, anchors, losses, NMS and COCO evaluator configured to D0.

`detection/train.py` is tf-models' vision driver with these registrations;
`detection/synthetic_coco.py` writes a small COCO-format data set for tests and the demo.

The repository's `detection/` folder is installed as the package `nse_tf_detection`
(setup.py's package_dir), so that `pip install` puts no generic top-level `detection`
package into site-packages; the commands keep their paths (`python detection/train.py`).
"""
