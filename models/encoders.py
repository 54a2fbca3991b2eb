"""Image encoders written in torch (no torchvision): any input size and channel count,
a projection head, L2-normalised output.

An encoder built with mirror_average (build_encoder; a run whose training flipped images,
core.training.augment) embeds each image in eval mode as the normalised mean of its own and its
mirror image's embeddings, so every inference path (the run's embedding, search queries, a loaded
checkpoint) gives the same flip-invariant vectors. Training mode embeds the image alone.

An encoder also carries its run's `precision` setting (auto | fp32 | bf16), which
core.training.loop.embed honours: a run trained under bf16 autocast embeds under it too, twice the
images a second on a CPU with bf16 instructions (so the mirror average's second pass costs no
more than one float32 pass did), with the same test metrics to ±0.001."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from models.widths import DEFAULT_WIDTHS, precision_problem, width_problem


class Encoder(nn.Module):
    """What every encoder here shares: `embed_images` maps (B, C, H, W) to unit rows; forward adds
    the mirror average in eval mode where `mirror_average` is set."""

    mirror_average = False
    precision = "auto"  # the run's precision setting; core.training.loop.embed embeds under it

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mirror_average and not self.training:
            # two passes, not one of the images and their mirrors concatenated: on a CPU a batch
            # twice as large falls out of cache (float32, 10,000 28x28 images: 2,365 against
            # 1,935 images/s on two cores)
            return F.normalize(self.embed_images(images) + self.embed_images(images.flip(-1)), dim=1)
        return self.embed_images(images)


class SmallCNN(Encoder):
    """Four conv blocks and global pooling. Input (B, C, H, W) float, output (B, embedding_dim).
    Channels: width, 2·width, 4·width, 4·width."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.features, channels = _conv_stack(in_channels, self.plan(width))
        self.head = ProjectionHead(channels, embedding_dim)

    @staticmethod
    def plan(width: int) -> list[tuple[int, bool]]:
        """(out_channels, halve) of each convolution (_conv_stack). Small inputs (8×8 digits) cannot
        be halved three times; pooling adapts."""
        widths = [width, width * 2, width * 4, width * 4]
        return [(out, i < len(widths) - 1) for i, out in enumerate(widths)]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.features(images), 1).flatten(1)
        return self.head(pooled)


class GridCNN(SmallCNN):
    """The small CNN's four conv blocks, its last map average-pooled to a GRID × GRID grid and
    flattened instead of to one vector: the embedding keeps where a feature is (a collar at the
    top, a sleeve at the side), not only that it is there. A 28×28 image's last map is 3×3
    already, so the pooling changes nothing there; any other size is brought to the same grid, so
    the head's size never depends on the images. The head is HIDDEN wide.

    Measured on Fashion-MNIST's test split (bench/quality.py's docstring): triplet loss, 8 epochs,
    P@1 0.906 and MAP@R 0.847 against global pooling's 0.902 and 0.841, each epoch 15-20 % slower
    on CPU. A 512-wide hidden layer (1.5 M parameters; the small CNN has 0.6 M, a full-width head
    3.7 M) loses nothing against the full-width head. Not the default: with flips and erasing, 10
    epochs reach 0.905 / 0.852 against the small CNN's 0.909 / 0.845; on digits' 8×8 images (a last
    map of 2×2 or less, repeated to the grid) P@1 / MAP@R after 8 epochs is 0.986 / 0.970 against
    0.992 / 0.971 with triplet loss, and 0.919 / 0.760 against 0.994 / 0.964 with the contrastive
    loss (hard pairs, margin 0.5)."""

    GRID = 3
    HIDDEN = 512

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, width: int = 48) -> None:
        super().__init__(in_channels, embedding_dim, width)
        self.head = ProjectionHead(4 * width * self.GRID * self.GRID, embedding_dim, hidden=self.HIDDEN)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(images), self.GRID).flatten(1))


class VGGCNN(SmallCNN):
    """Three VGG-style stages of two 3×3 convolutions each (channels width, 2·width, 4·width), each
    stage max-pooled (before its last ReLU), then, as in SmallCNN, global pooling and the projection
    head. Twice the convolutions of the small CNN at the resolutions where shape is decided, and
    fewer channels: at width 32 it has half the small CNN's parameters (0.32 M against 0.60 M) and
    a CPU step costs about 1.1 of the small CNN's at width 48.

    Measured on Fashion-MNIST's test split (bench/quality.py's docstring), supcon τ 0.07,
    flip+erase, bf16, embedded with the mirror average: 16 epochs P@1 0.924, MAP@R 0.869; 14
    epochs 0.923 / 0.866 and 0.914 / 0.864 (two seeds); triplet, 14 epochs 0.918 / 0.864. The small
    CNN and the grid CNN stop at about 0.91 / 0.85 however long they train."""

    STAGE_CONVS = (2, 2, 2)

    @classmethod
    def plan(cls, width: int) -> list[tuple[int, bool]]:
        """Each stage's last convolution halves: 8×8 digits are halved twice, then kept."""
        return [(width * 2 ** stage, i == convs - 1) for stage, convs in enumerate(cls.STAGE_CONVS) for i in range(convs)]


class VGGGridCNN(GridCNN, VGGCNN):
    """vgg_cnn's three stages (VGGCNN.plan) with grid_cnn's head (GridCNN): the last map, 3×3 on
    28×28 images, average-pooled to a GRID × GRID grid and flattened into a HIDDEN-wide projection
    head, so the embedding keeps where a feature is. 0.94 M parameters at width 32 and 128-d embeddings
    (vgg_cnn 0.32 M; most of the difference is the head's first layer); a CPU step costs about
    1.05-1.09 of vgg_cnn's.

    Measured on Fashion-MNIST's test split (bench/quality.py's docstring), supcon τ 0.07,
    flip+erase, bf16, 15 epochs, embedded with the mirror average, seeds 0-3: P@1 0.920-0.926
    (mean 0.923), MAP@R 0.870-0.876 (mean 0.874), against vgg_cnn's 0.914-0.924 (mean 0.921) and
    0.864-0.872 (mean 0.868) in 14-16 epochs. On digits' 8×8 images (a last map of 2×2, repeated to
    the grid) it is a little worse: supcon, 8 epochs, three seeds, P@1 0.983-0.986 and MAP@R
    0.962-0.983 against vgg_cnn's 0.986-0.994 and 0.974-0.984; with the contrastive loss 0.958 /
    0.906 against 0.975 / 0.962."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, width: int = 32) -> None:
        super().__init__(in_channels, embedding_dim, width)  # vgg_cnn's default width, not grid_cnn's 48


def _conv_stack(in_channels: int, plan: list[tuple[int, bool]]) -> tuple[nn.Sequential, int]:
    """conv 3×3 → batch norm → (max-pool 2 where the plan says and the map is large enough) → ReLU, one
    per (out_channels, halve) of `plan`; and the channels it ends with. It pools before the ReLU:
    max-pooling and ReLU commute (both keep order), so the output and gradients are the same, and
    the ReLU and its backward pass touch a quarter of the values (6% of a CPU training step)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for out, halve in plan:
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)]
        if halve:
            layers.append(_HalveIfLarge())
        layers.append(nn.ReLU(inplace=True))
        channels = out
    return nn.Sequential(*layers), channels


class _HalveIfLarge(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 4 else x


class ProjectionHead(nn.Module):
    """Linear → ReLU → Linear, then L2 normalisation in float32 (under bf16 autocast too, so the
    loss and the distances it sorts see full-precision unit vectors). hidden: the middle layer's
    width (None: in_features)."""

    def __init__(self, in_features: int, embedding_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_features
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embedding_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).float(), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18(Encoder):
    """ResNet-18 layout (2-2-2-2 basic blocks). The stem is a 3×3 conv without max-pool, as is
    usual for small images (CIFAR-style); large inputs are halved once first."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, width: int = 64) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages = []
        in_planes = width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = ProjectionHead(in_planes, embedding_dim)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) > 64:
            images = F.avg_pool2d(images, 2)
        x = self.stages(self.stem(images))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_encoder(name: str, in_channels: int, embedding_dim: int, width: int | None = None,
                  mirror_average: bool = False, precision: str = "auto") -> nn.Module:
    """The encoder `name` (vgg_grid, vgg_cnn, small_cnn, grid_cnn, resnet18); width None is the encoder's DEFAULT_WIDTHS
    entry. mirror_average: embed in eval mode as the mean of the image and its mirror image (a run
    trained with flips; models.widths.mirror_averaged of its stored config). precision: the run's
    precision setting, which embedding follows (Encoder.precision)."""
    if name not in DEFAULT_WIDTHS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(DEFAULT_WIDTHS)}")
    width = DEFAULT_WIDTHS[name] if width is None else width
    problem = width_problem(width) or precision_problem(precision)
    if problem:
        raise ValueError(problem)
    classes = {"vgg_grid": VGGGridCNN, "vgg_cnn": VGGCNN, "small_cnn": SmallCNN, "grid_cnn": GridCNN,
               "resnet18": ResNet18}
    model = classes[name](in_channels, embedding_dim, width)
    model.mirror_average = bool(mirror_average)
    model.precision = precision
    return model


def folded_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each batch norm folded into the convolution before it
    (torch.nn.utils.fuse_conv_bn_eval): the same embeddings to float rounding, without the batch
    norms' pass over the activations, a quarter of the small CNN's forward time on a CPU. `model`
    itself is left as it was (its mode included)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(module[i], module[i + 1]), nn.Identity()
        elif isinstance(module, BasicBlock):
            module.conv1, module.bn1 = fuse_conv_bn_eval(module.conv1, module.bn1), nn.Identity()
            module.conv2, module.bn2 = fuse_conv_bn_eval(module.conv2, module.bn2), nn.Identity()
    return folded


def in_channels_of(model: nn.Module) -> int:
    """The channel count the encoder's first convolution takes."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(first_conv.in_channels)


def to_input(pixels: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (B, H, W, C) → float (B, in_channels, H, W) in [-1, 1]; grey ↔ colour as needed."""
    x = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[1] == in_channels:
        return x
    if in_channels == 3:
        return x.expand(-1, 3, -1, -1)
    return x.mean(dim=1, keepdim=True)
