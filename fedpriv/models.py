"""Models from timm's registry, made trainable by Opacus with per-layer per-sample gradients.

fedpriv registers small DP-friendly models in timm's registry (`fedpriv_*`): a hybrid vision
transformer with a GroupNorm conv stem (a plain ViT from scratch is weak on a thousand images),
a GroupNorm CNN, and that CNN beside fixed wavelet scattering features. The ViT's position
embedding lives in its own module with an Opacus grad sampler, so Opacus never falls back to
functorch over the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.validators import ModuleValidator
from timm import create_model, is_model, list_models
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedpriv.errors import FedprivError
from fedpriv.internals import register_timm_layer_norm, scattering_2d, without_timm_plumbing
from fedpriv.settings import ModelSettings


class LearnedPositionEmbedding(nn.Module):
    """Adds a learned (1, tokens, dim) embedding; a module of its own for Opacus."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


@register_grad_sampler(LearnedPositionEmbedding)
def _position_embedding_grad_sample(layer, activations, backprops):
    """d(x + w)/dw per sample is the sample's backprop itself."""
    return {layer.weight: backprops.unsqueeze(1)}


register_timm_layer_norm()


def _conv_gn(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.GroupNorm(min(8, out_ch // 4), out_ch), nn.GELU()
    )


class ConvStemEmbed(nn.Module):
    """Patch embedding for timm's ViT: GroupNorm conv stem (/4), projection (/2), positions.

    Follows timm's `embed_layer` interface; outputs (B, tokens, dim).
    """

    def __init__(self, img_size=64, patch_size=8, in_chans=1, embed_dim=96, bias=True, stem_width=32, **_):
        super().__init__()
        if patch_size != 8 or img_size % 8:
            raise FedprivError("the conv-stem ViT needs model.kwargs.patch_size=8 and data.image_size divisible by 8")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Sequential(_conv_gn(in_chans, stem_width // 2, 2), _conv_gn(stem_width // 2, stem_width, 2))
        self.proj = nn.Conv2d(stem_width, embed_dim, 2, 2, bias=bias)
        self.pos = LearnedPositionEmbedding(self.num_patches, embed_dim)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.stem(x)).flatten(2).transpose(1, 2)
        return self.pos(x)


@register_model
def fedpriv_vit_hybrid_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Conv-stem ViT for small grayscale patches: 8×8 tokens, mean-pooled, no class token."""
    kwargs = _own_model_kwargs(pretrained, kwargs)
    stem_width = kwargs.pop("stem_width", 32)
    args = dict(img_size=64, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    args.update(kwargs)
    return VisionTransformer(
        **args,
        class_token=False,
        global_pool="avg",
        pos_embed="none",
        embed_layer=lambda **kw: ConvStemEmbed(stem_width=stem_width, **kw),
    )


class SmallGroupNormCNN(nn.Module):
    """Stem conv16 + 3 blocks of two 3×3 convs (32/64/128) with GroupNorm, pooled to a logit.
    `stem_stride=2` reads full-resolution pixels in the stem and runs the blocks at half the
    resolution (about the cost of half the image size)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 1, widths=(32, 64, 128), stem_stride: int = 1):
        super().__init__()
        layers, width = [_conv_gn(in_chans, 16, stem_stride)], 16
        for out in widths:
            layers += [_conv_gn(width, out, 1), _conv_gn(out, out, 1), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's interface: pooled features (pre_logits) or the logit."""
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Module:
        """timm's interface: the classifier head (what training.freeze=backbone trains)."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def fedpriv_cnn_small(pretrained: bool = False, **kwargs) -> SmallGroupNormCNN:
    """The GroupNorm CNN of shared/notes, a strong from-scratch baseline under DP."""
    kwargs = _own_model_kwargs(pretrained, kwargs)
    kwargs.pop("img_size", None)
    return SmallGroupNormCNN(**kwargs)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and flips of a batch of patches (mass patches have no orientation)."""
    views = []
    for k in range(4):
        turned = torch.rot90(x, k, dims=(-2, -1))
        views += [turned, turned.flip(-1)]
    return views


def scattering_permutations(scales: int, angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For kymatio's channel order (order 0; order 1 by (j, θ); order 2 by (j1, θ1, j2 > j1, θ2)):
    the channel each channel of a patch turned by 90° (`turn`) or mirrored left–right
    (`mirror`) reads from the untouched patch's transform. A 90° turn shifts every
    orientation by angles/2; a mirror maps orientation l to (angles − 2 − l) mod angles."""

    def channels(orientation) -> torch.Tensor:
        first = {(j, l): 1 + j * angles + l for j in range(scales) for l in range(angles)}
        second = [(j1, l1, j2, l2) for j1 in range(scales) for l1 in range(angles) for j2 in range(j1 + 1, scales) for l2 in range(angles)]
        index = {key: 1 + scales * angles + i for i, key in enumerate(second)}
        return torch.tensor(
            [0]
            + [first[(j, orientation(l))] for j in range(scales) for l in range(angles)]
            + [index[(j1, orientation(l1), j2, orientation(l2))] for j1, l1, j2, l2 in second]
        )

    return channels(lambda l: (l + angles // 2) % angles), channels(lambda l: (angles - 2 - l) % angles)


class ScatteringCNN(SmallGroupNormCNN):
    """The GroupNorm CNN's pooled features beside the log wavelet-scattering coefficients of
    the patch (Mallat's scattering transform: fixed Morlet filters, no parameters, no data;
    Tramèr & Boneh, ICLR 2021: DP learning needs better features), both averaged over the 8
    rotations and flips of the patch, standardized, and read by one linear head.

    Scattering: `scattering_scales` (J) octaves, `scattering_angles` (L, a multiple of 4)
    orientations, order 2, of the patch in [0, 1] (inputs come normalized to [-1, 1]),
    average-pooled to a `scattering_grid`² grid, then log(1e-3 + S). It is computed once per
    patch: turning the patch by 90° or mirroring it turns the coefficient maps and permutes
    their orientations, so the 8 views' coefficients are the permuted, turned maps of one
    transform (to within about 2 % after pooling; the CNN runs on all 8 views). The
    standardization (`feature_mean`, `feature_scale`: 0 and 1 until `fit_standardization`)
    centres every feature: without it DP-SGD spends its clipping budget on the features'
    common offset. `components` (None: every feature): the head reads only the standardized
    features' first `components` principal components, whitened (`projection`, fit with the
    standardization): DP-SGD's noise grows with the number of coefficients the head has, the
    signal lives in a few directions. `forward_features`/`forward_head(pre_logits=True)` are
    the CNN's alone, so a prior trains (and an embedding reads) the CNN as in fedpriv_cnn_small."""

    def __init__(self, in_chans: int = 1, num_classes: int = 1, widths=(32, 64, 128), stem_stride: int = 1,
                 img_size: int = 64, scattering_scales: int = 2, scattering_angles: int = 8, scattering_grid: int = 4,
                 components: int | None = None):
        super().__init__(in_chans, num_classes, widths, stem_stride)
        if scattering_angles % 4:
            raise ValueError(f"scattering_angles={scattering_angles} must be a multiple of 4 (turns of 90° permute orientations)")
        self.scattering = scattering_2d(scattering_scales, img_size, scattering_angles)
        self.scattering_grid = scattering_grid
        turn, mirror = scattering_permutations(scattering_scales, scattering_angles)
        self.register_buffer("turn", turn, persistent=False)
        self.register_buffer("mirror", mirror, persistent=False)
        dims = widths[-1] + in_chans * len(turn) * scattering_grid**2
        if components is not None and not 0 < components <= dims:
            raise ValueError(f"components={components} must be between 1 and the {dims} features")
        self.components = components
        self.head = nn.Linear(components or dims, num_classes)
        self.register_buffer("feature_mean", torch.zeros(dims))
        self.register_buffer("feature_scale", torch.ones(dims))
        if components is not None:  # the first `components` features until fit_standardization
            self.register_buffer("projection", torch.eye(dims, components))

    def joint_features(self, x: torch.Tensor) -> torch.Tensor:
        """CNN and scattering features, each averaged over the 8 views, not yet standardized."""
        pooled = sum(self.forward_head(self.forward_features(view), pre_logits=True) for view in dihedral_views(x)) / 8
        coefficients = self.scattering(((x + 1) / 2).contiguous())  # N, C, K, h, w
        maps = F.adaptive_avg_pool2d(coefficients.flatten(0, 1), self.scattering_grid).unflatten(0, coefficients.shape[:2])
        views, order = 0, torch.arange(maps.shape[2], device=x.device)
        for k in range(4):
            turned = torch.rot90(maps[:, :, order], k, dims=(-2, -1))
            views = views + turned + turned[:, :, self.mirror].flip(-1)
            order = order[self.turn]
        return torch.cat([pooled, torch.log(1e-3 + (views / 8).clamp(min=0).flatten(1))], dim=1)

    @torch.no_grad()
    def fit_standardization(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Set the standardization to the mean and standard deviation of these (normalized)
        images' features, and the projection (with `components`) to their standardized
        features' leading principal directions, each scaled to unit variance."""
        features = torch.cat([self.joint_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(features.std(0).clamp(min=1e-6))
        if self.components is None:
            return
        if self.components >= len(images):
            raise FedprivError(
                f"model.kwargs.components={self.components} needs more than that many validation images to fit "
                f"(there are {len(images)}); lower it"
            )
        standardized = (features - self.feature_mean) / self.feature_scale
        _, spread, directions = torch.linalg.svd(standardized, full_matrices=False)
        scale = spread[: self.components] / (len(images) - 1) ** 0.5
        self.projection.copy_(directions[: self.components].T / scale.clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardized = (self.joint_features(x) - self.feature_mean) / self.feature_scale
        return self.head(standardized if self.components is None else standardized @ self.projection)


@register_model
def fedpriv_cnn_scatter(pretrained: bool = False, **kwargs) -> ScatteringCNN:
    """fedpriv_cnn_small beside fixed wavelet scattering features, 8-view invariant, standardized."""
    return ScatteringCNN(**_own_model_kwargs(pretrained, kwargs))


def _own_model_kwargs(pretrained: bool, kwargs: dict) -> dict:
    """Drop timm's pretrained-config plumbing; fedpriv's own models train from scratch."""
    if pretrained:
        raise FedprivError("fedpriv models have no pretrained weights; set model.kwargs.pretrained=false")
    return without_timm_plumbing(kwargs)


def build_model(settings: ModelSettings, image_size: int, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """A one-logit classifier from timm's registry, fixed for Opacus (BatchNorm → GroupNorm,
    the BatchNorm's affine weights carried over). `pretrained`: timm's weights from the local
    cache (fedpriv.priors.start asks for them once, for the run's starting point)."""
    if not is_model(settings.name):
        close = list_models(f"*{settings.name.split('_')[0]}*")[:5]
        raise FedprivError(f"model.name={settings.name!r} is not in timm's registry (similar: {close})")
    kwargs = dict(settings.kwargs)
    kwargs.setdefault("pretrained", pretrained)
    try:
        try:
            model = create_model(settings.name, num_classes=1, in_chans=in_chans, img_size=image_size, **kwargs)
        except TypeError:  # timm models without an img_size argument (CNNs)
            model = create_model(settings.name, num_classes=1, in_chans=in_chans, **kwargs)
    except Exception as error:  # whatever timm raises for these kwargs (e.g. mlp_ratio='' or -1, num_heads=0)
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FedprivError(f"model.kwargs do not fit model.name={settings.name!r}: {first_line}") from None
    return make_opacus_compatible(model)


#: The BatchNorms Opacus' ModuleValidator.fix replaces with a GroupNorm.
OPACUS_REPLACES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def make_opacus_compatible(model: nn.Module) -> nn.Module:
    """BatchNorm → GroupNorm (Opacus' ModuleValidator) and no in-place activations, which
    break Opacus' backward hooks. The BatchNorm's learned scale and shift are copied into the
    GroupNorm that replaces it (Opacus would start it at 1 and 0, losing pretrained weights)."""
    if ModuleValidator.validate(model, strict=False):
        affine = {
            name: (m.weight.detach().clone(), m.bias.detach().clone())
            for name, m in model.named_modules()
            if isinstance(m, OPACUS_REPLACES) and m.affine
        }
        model = ModuleValidator.fix(model)
        replaced = dict(model.named_modules())
        with torch.no_grad():
            for name, (weight, bias) in affine.items():
                norm = replaced[name]
                if isinstance(norm, nn.GroupNorm) and norm.affine:
                    norm.weight.copy_(weight)
                    norm.bias.copy_(bias)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def takes_volumes(model: nn.Module) -> bool:
    """Whether the model reads 3D volumes (it has 3D convolutions)."""
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def classifier_parameters(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters (timm's `get_classifier`; empty without one)."""
    if not hasattr(model, "get_classifier"):
        return set()
    head = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def freeze_backbone(model: nn.Module, settings_name: str) -> None:
    """Train only the classifier head (timm's `get_classifier`): every other parameter stops
    requiring gradients, so DP-SGD clips and noises the head alone."""
    head = classifier_parameters(model)
    if not head:
        raise FedprivError(
            f"training.freeze=backbone needs a model with classifier parameters (timm's get_classifier()); "
            f"model.name={settings_name} has none"
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head)


def _conv3d_gn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.GroupNorm(max(1, min(8, out_ch // 4)), out_ch),
        nn.GELU(),
    )


class SmallGroupNormCNN3d(nn.Module):
    """Stride-2 3×3×3 stem (8), then 3×3×3 conv stages (16/32/64) max-pooled between, averaged to a logit.

    For CT volumes (N×C×D×H×W, edges ≥ 8): ~73k parameters, GroupNorm instead of
    BatchNorm, and only layers Opacus has per-sample grad samplers for (Conv3d, GroupNorm, Linear).
    The strided stem spares full-resolution feature maps, the main cost on a CPU.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 1, widths=(8, 16, 32, 64), **_):
        super().__init__()
        layers, width = [_conv3d_gn(in_chans, widths[0], stride=2)], widths[0]
        for stage, out in enumerate(widths[1:]):
            layers += ([nn.MaxPool3d(2)] if stage else []) + [_conv3d_gn(width, out)]
            width = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))

    def get_classifier(self) -> nn.Module:
        return self.head


@register_model
def fedpriv_cnn3d_small(pretrained: bool = False, **kwargs) -> SmallGroupNormCNN3d:
    """The 3D GroupNorm CNN for CT volumes, trained from scratch (DP-friendly: no BatchNorm)."""
    kwargs = _own_model_kwargs(pretrained, kwargs)
    kwargs.pop("img_size", None)
    return SmallGroupNormCNN3d(**kwargs)
