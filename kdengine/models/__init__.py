"""The model zoo: ``create_model(name, num_classes=...)`` builds any registered model.

Every model is a ``KDModel`` returning ``ModelOutput(logits, features, hints)``; ``features``
lists the stage outputs before their final ReLU (entry 0 is the stem, which ADM's L_feat skips; the
last is the map the classifier ``head`` pools, logits = head(avgpool(relu(features[-1])))).
``hints`` are FitNet's taps, the maps the CIFAR-KD code (CRD / mdistiller) lists as ``feats``, one
per entry of ``features`` with the same channels; None where they are ``relu(features[i])`` entry
for entry. Each family's module says which maps it reports.

Each registry name is a function decorated with ``@register_model`` (``def resnet56(...)``);
``load_pretrained`` fills a model from a kdengine checkpoint, a torchvision state dict or a
CIFAR-KD zoo teacher (``pretrained``).

Registry names (``list_models()``):
- CIFAR (CRD / mdistiller zoo, 32 px): ``resnet8`` ``resnet14`` ``resnet20`` ``resnet32``
  ``resnet44`` ``resnet56`` ``resnet110`` ``resnet8x4`` ``resnet32x4`` (cifar_resnet);
  ``wrn_16_1`` ``wrn_16_2`` ``wrn_40_1`` ``wrn_40_2`` ``wrn_16_10`` (wrn); ``vgg8`` ``vgg11``
  ``vgg13`` ``vgg16`` ``vgg19``, all with BN (vgg); ``mobilenetv2`` (width 1.0, ``width_mult``
  kwarg) and ``mobilenetv2_0_5`` (the tables' "MobileNetV2") (cifar_mobilenetv2);
  ``shufflenetv1`` ``shufflenetv2`` (shufflenet); ``resnet18_cifar`` ``resnet50_cifar``
  (imagenet_resnet with a CIFAR stem: the zoo's "ResNet18"/"ResNet50").
- ImageNet (torchvision-compatible state dicts): ``resnet18`` ``resnet34`` ``resnet50``
  ``resnet101`` ``resnet152`` (imagenet_resnet); ``mobilenet_v2`` (torchvision's name, with
  ``width_mult``) and ``mobilenetv1`` (imagenet_mobilenet).
- timm layouts (state dicts load from timm checkpoint files with ``strict=True``; ``img_size``
  and ``drop_path_rate`` arguments): ``deit_tiny_patch16_224`` ``vit_small_patch16_224`` (vit);
  ``swin_tiny_patch4_window7_224`` ``swin_pico_patch4_window7_224``
  ``swin_nano_patch4_window7_224`` (swin); ``mixer_b16_224`` (mlp_mixer); ``resmlp_12_224``
  (resmlp); ``convnext_tiny`` (convnext); ``mobilenetv2_100`` (timm_mobilenetv2). timm's
  ResNet-18/50 layouts equal torchvision's (``resnet18``, ``resnet50`` above). Token models
  report ``[B, L, C]`` token features (``feature_format == "tokens"``), see their modules.
- Semantic segmentation (dilated ResNets at output stride 8, ``deep_stem``, ``aux``, ``width``
  and ``head_channels`` options, ImageNet backbone weights through ``backbone_weights``): ``deeplabv3_resnet18``
  ``deeplabv3_resnet101`` ``pspnet_resnet18`` ``pspnet_resnet101`` (segmentation). Their
  ``forward`` returns a ``SegOutput`` (per-pixel logits, auxiliary logits, the head feature and
  the stage features) instead of a ``ModelOutput``.
No CIFAR ResNet has an ImageNet depth, so plain ``resnetN`` names cannot collide; the ``_cifar``
suffix marks the CIFAR-stem copies of ImageNet depths, and ``mobilenet_v2`` (ImageNet) vs
``mobilenetv2`` (CIFAR) follows torchvision's spelling for the torchvision model.
"""
# Importing the family modules fills the registry.
from . import (  # noqa: F401
    cifar_mobilenetv2,
    cifar_resnet,
    convnext,
    imagenet_mobilenet,
    imagenet_resnet,
    mlp_mixer,
    resmlp,
    segmentation,
    shufflenet,
    swin,
    timm_mobilenetv2,
    vgg,
    vit,
    wrn,
)
from .base import KDModel, ModelOutput, create_model, list_models, register_model
from .pretrained import load_pretrained
from .segmentation import SEGMENTATION_MODELS, SegOutput
from .utils import count_parameters

__all__ = ["KDModel", "ModelOutput", "SEGMENTATION_MODELS", "SegOutput", "count_parameters", "create_model",
           "list_models", "load_pretrained", "register_model"]
