"""VMamba v0 ImageNet weights in Swin-UMamba's and Swin-UMamba-dagger's encoder: the checkpoint's spec (attached to
both networks, so ``create_network("swin_umamba", pretrained=True)`` loads it) and :func:`load_vmamba_encoder`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Mapping

import torch
from timm.models import adapt_input_conv

from .registry import register_pretrained
from .swin_umamba import _SwinUMambaBase
from .weights import PretrainedSpec

# Checkpoint keys of VMamba's ImageNet classifier, which the segmentation networks do not have.
_CLASSIFIER_KEYS = ("norm.weight", "norm.bias", "head.weight", "head.bias")
# the convolution that reads the image
_FIRST_CONV = "patch_embed.proj"

VMAMBA_TINY = PretrainedSpec(
    name="vmamba-tiny",
    file_name="vssmtiny_dp01_ckpt_epoch_292.pth",
    urls=("https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth",
          "https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/vssmtiny_dp01_ckpt_epoch_292.pth"),
    manifest="vmamba_tiny_v0_keys.json",
    # Early uploads pickle the yacs training config beside the weights; loading it as a plain dict needs neither
    # yacs nor unrestricted unpickling.
    inert_globals=("yacs.config.CfgNode",),
    # Not pinned: the release was re-uploaded (with and without the config), so no single digest is authoritative,
    # and no machine of ours could download it. A third-party provisioning guide records this digest for the
    # #v0cls upload (91,649,482 bytes); `download-weights` says whether a file matches it.
    reported_sha256=("dbc0cc4f5ec0e45db5fba7c939d2c7d9b617e891ac10766912a8d604c37c5e47",),
    description="VMamba-T v0, ImageNet-1k (82.2% top-1): the encoder initialisation of Swin-UMamba",
    first_conv=_FIRST_CONV,
    classifier=_CLASSIFIER_KEYS,
)


@dataclass
class EncoderLoadReport:
    """What :func:`load_vmamba_encoder` did. Keys of ``loaded``/``adapted``/``missing`` are the network's,
    keys of ``skipped``/``unexpected`` the checkpoint's."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # loaded after adapting the input channels (in ``loaded``)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was left out
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the encoder has no place for
    missing: list[str] = field(default_factory=list)  # encoder keys the checkpoint did not provide


def _encoder_key(checkpoint_key: str) -> str:
    # Swin-UMamba keeps VMamba's layers.i.downsample as vssm_encoder.downsamples.i
    return "vssm_encoder." + re.sub(r"^layers\.(\d+)\.downsample\.", r"downsamples.\1.", checkpoint_key)


def _adaptable_rgb_kernel(checkpoint_shape: torch.Size, network_shape: torch.Size) -> bool:
    """An RGB convolution kernel that fits the network's but for the number of input channels."""
    return (len(checkpoint_shape) == len(network_shape) == 4 and checkpoint_shape[1] == 3 != network_shape[1]
            and checkpoint_shape[0] == network_shape[0] and checkpoint_shape[2:] == network_shape[2:])


# The original Swin-UMamba's skip list (swin_umamba/nnunetv2/nets/SwinUMamba.py load_pretrained_ckpt, JiarunLiu/
# Swin-UMamba) names patch_embed.norm.weight twice and patch_embed.norm.bias not at all, so it loads that bias.
_ORIGINAL_SWIN_UMAMBA_LOADS = frozenset({"patch_embed.norm.bias"})


def load_vmamba_encoder(network: _SwinUMambaBase, checkpoint_state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True, faithful: bool = True) -> EncoderLoadReport:
    """Copy a VMamba v0 ImageNet checkpoint (e.g. VMamba-Tiny, ``vssmtiny_dp01_ckpt_epoch_292.pth``) into the
    encoder of a :class:`SwinUMamba` or :class:`SwinUMambaD`, in place.

    ``checkpoint_state_dict`` is the checkpoint's ``'model'`` dict; a whole training checkpoint holding one under
    ``'model'`` is accepted too (its other entries are ignored). Always left out: the classifier (``norm.*``,
    ``head.*``). The decoders, the stem and the conv skips stay as initialised. The patch embedding:

    - ``faithful=True`` (the default): exactly the original's ``load_pretrained_ckpt``
      (JiarunLiu/Swin-UMamba, ``swin_umamba/nnunetv2/nets/SwinUMamba.py`` and ``SwinUMambaD.py``). Swin-UMamba
      skips ``patch_embed.proj.*`` and ``patch_embed.norm.weight`` but loads ``patch_embed.norm.bias`` (its skip
      list names ``norm.weight`` twice); Swin-UMamba-dagger loads all four ``patch_embed.*`` tensors when the
      checkpoint's kernel has as many input channels as the network, and skips all four otherwise.
    - ``faithful=False``: Swin-UMamba skips all of ``patch_embed.*`` (it reads the 48-channel stem, not an image:
      what the original meant); Swin-UMamba-dagger with other than 3 input channels loads the patch embedding
      with the RGB kernel adapted by timm's ``adapt_input_conv`` (1 channel: the sum of the RGB kernels, i.e. a
      grey image seen as R = G = B; C channels: the RGB kernels cycled and scaled by 3/C to keep the activation
      scale).

    Raises ValueError, before changing anything, when a tensor's shape does not fit, when nothing matches, and
    (``strict``) when the checkpoint has encoder-like keys the network lacks or lacks some of the encoder's.
    """
    if not isinstance(network, _SwinUMambaBase):
        raise TypeError(f"expected a SwinUMamba or SwinUMambaD network, got {type(network).__name__}")
    state = checkpoint_state_dict
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    targets = {k: v for k, v in network.state_dict(keep_vars=True).items() if k.startswith("vssm_encoder.")}
    report = EncoderLoadReport()
    pending: dict[str, torch.Tensor] = {}
    mismatched = []
    kernel = state.get(f"{_FIRST_CONV}.weight")
    channels = targets[f"vssm_encoder.{_FIRST_CONV}.weight"].shape[1]
    # the checkpoint's patch-embedding keys this call loads
    if not network.patch_embed_reads_image:
        embedding_loaded = _ORIGINAL_SWIN_UMAMBA_LOADS if faithful else frozenset()
    elif faithful and torch.is_tensor(kernel) and kernel.dim() == 4 and kernel.shape[1] != channels:
        embedding_loaded = frozenset()
    else:
        embedding_loaded = None  # all of them
    for key, value in state.items():
        if key in _CLASSIFIER_KEYS:
            report.skipped[key] = "ImageNet classifier (final norm and head)"
            continue
        if key.startswith("patch_embed.") and embedding_loaded is not None and key not in embedding_loaded:
            if not network.patch_embed_reads_image:
                report.skipped[key] = ("Swin-UMamba's patch embedding reads the 48-channel stem, not an RGB image"
                                       + (" (the original's skip list)" if faithful else ""))
            else:
                report.skipped[key] = (f"the checkpoint's patch embedding reads {kernel.shape[1]} channels, the "
                                       f"network's {channels} (the original skips it)")
            continue
        target = _encoder_key(key)
        if target not in targets or not torch.is_tensor(value):
            report.unexpected.append(key)
            continue
        expected = targets[target].shape
        if key == f"{_FIRST_CONV}.weight" and not faithful and _adaptable_rgb_kernel(value.shape, expected):
            value = adapt_input_conv(expected[1], value)
            report.adapted.append(target)
        if value.shape != expected:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, network {target} {tuple(expected)}")
            continue
        pending[target] = value
    if mismatched:
        raise ValueError(f"{len(mismatched)} checkpoint tensor(s) do not fit {type(network).__name__}'s encoder "
                         "(is this VMamba-Tiny v0?): " + "; ".join(mismatched[:5]))
    if not pending:
        raise ValueError(f"no tensor of the checkpoint matches {type(network).__name__}'s encoder (expected VMamba "
                         f"v0 keys such as 'layers.0.blocks.0.self_attention.x_proj_weight'); first keys: "
                         f"{list(state)[:5]}")
    embedding = "vssm_encoder.patch_embed."
    loadable = [k for k in targets if not k.startswith(embedding) or embedding_loaded is None
                or k[len("vssm_encoder."):] in embedding_loaded]
    report.missing = [k for k in loadable if k not in pending]
    if strict and (report.unexpected or report.missing):
        raise ValueError(f"checkpoint and {type(network).__name__}'s encoder differ (a VMamba other than Tiny v0?): "
                         f"{len(report.unexpected)} unexpected key(s) {report.unexpected[:5]}, "
                         f"{len(report.missing)} missing {report.missing[:5]}; pass strict=False to load the rest")
    with torch.no_grad():
        for target, value in pending.items():
            targets[target].copy_(value)
    report.loaded = list(pending)
    return report


for _network in ("swin_umamba", "swin_umamba_d"):
    register_pretrained(_network, VMAMBA_TINY, load_vmamba_encoder)
