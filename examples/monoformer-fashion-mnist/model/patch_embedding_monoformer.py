"""U-Net patch path (Transfusion, `config.patch_embedder="unet"`): down blocks to the patch grid before the transformer,
mirrored up blocks after it with skips from the down path, timestep conditioning inside every ResNet block.

The blocks are diffusers' `DownBlock2D` / `UpBlock2D` (ResNet blocks with a timestep projection, stride-2 conv
downsampling, nearest + conv upsampling) wired as `UNet2DModel` wires them; the transformer takes the place of the
U-Net's middle block. With `L = len(config.unet_block_channels)` levels the blocks downsample by `2 ** (L - 1)`; the
rest of the patch, `r = patch_size / 2 ** (L - 1)`, is a linear `r x r` patchify of the last level's features. So a
large patch (7 for 28x28 images: 16 tokens; 8 for 32x32) costs conv work at the image's resolution instead of a single
linear layer over raw pixels.

This file travels with saved checkpoints: flat sibling imports only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # diffusers is a hard dependency of the package, optional for loaders that only read text
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
except ImportError:  # pragma: no cover - exercised only without diffusers
    DownBlock2D = UpBlock2D = None


def unet_residual_patch(config) -> int:
    """Side of the linear patch after the down blocks: `patch_size / 2 ** (levels - 1)`."""
    return config.patch_size // 2 ** (len(config.unet_block_channels) - 1)


def unet_head_features(config) -> int:
    """Features per token the diffusion head writes for the up blocks: `r * r * channels of the last level`."""
    return unet_residual_patch(config) ** 2 * config.unet_block_channels[-1]


def _norm_groups(channels: list[int]) -> int:
    """GroupNorm groups dividing every level's width (32 as diffusers' U-Nets, fewer for narrow blocks)."""
    return math.gcd(32, *channels)


class MonoFormerUNetPatchEncoder(nn.Module):
    """Latents (n, C, h, w) + timestep embeddings (n, D) -> patch tokens (n, h/p * w/p, D) and the down path's skips."""

    def __init__(self, config):
        super().__init__()
        if DownBlock2D is None:
            raise ImportError("The U-Net patch path needs `diffusers`: `pip install diffusers`.")
        channels = list(config.unet_block_channels)
        hidden = config.text_config.hidden_size
        groups = _norm_groups(channels)
        self.residual_patch = unet_residual_patch(config)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        in_channels = channels[0]
        for i, out_channels in enumerate(channels):
            self.down_blocks.append(
                DownBlock2D(
                    in_channels=in_channels,
                    out_channels=out_channels,
                    temb_channels=hidden,
                    num_layers=config.unet_layers_per_block,
                    resnet_groups=groups,
                    add_downsample=i < len(channels) - 1,
                )
            )
            in_channels = out_channels
        r = self.residual_patch
        self.proj = nn.Linear(channels[-1] * r * r, hidden)

    def forward(self, latents: torch.Tensor, timestep_embeds: torch.Tensor):
        x = self.conv_in(latents)  # (n, c0, h, w)
        skips = (x,)
        for block in self.down_blocks:
            x, states = block(x, timestep_embeds)  # (n, c_i, h / 2^i, w / 2^i)
            skips = skips + states
        r = self.residual_patch
        tokens = F.pixel_unshuffle(x, r)  # (n, c_last * r * r, gh, gw); features in (c, ph, pw) order
        tokens = self.proj(tokens.flatten(2).transpose(1, 2))  # (n, T, D), T = gh * gw row-major
        return tokens, skips


class MonoFormerUNetPatchDecoder(nn.Module):
    """The head's token features (n, T, r * r * c_last) + the encoder's skips -> diffusion output (n, C_out, h, w)."""

    def __init__(self, config):
        super().__init__()
        if UpBlock2D is None:
            raise ImportError("The U-Net patch path needs `diffusers`: `pip install diffusers`.")
        channels = list(reversed(config.unet_block_channels))
        groups = _norm_groups(channels)
        hidden = config.text_config.hidden_size
        self.residual_patch = unet_residual_patch(config)
        self.patch_size = config.patch_size
        self.up_blocks = nn.ModuleList()
        out_channels = channels[0]
        for i in range(len(channels)):
            prev_channels, out_channels = out_channels, channels[i]
            skip_channels = channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(
                UpBlock2D(
                    in_channels=skip_channels,
                    prev_output_channel=prev_channels,
                    out_channels=out_channels,
                    temb_channels=hidden,
                    num_layers=config.unet_layers_per_block + 1,  # one more: the skip of each downsampler / conv_in
                    resnet_groups=groups,
                    add_upsample=i < len(channels) - 1,
                )
            )
        self.norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor, timestep_embeds: torch.Tensor, skips, height: int, width: int):
        r, p = self.residual_patch, self.patch_size
        gh, gw = height // p, width // p
        x = features.transpose(1, 2).reshape(features.shape[0], -1, gh, gw)  # (n, c_last * r * r, gh, gw)
        x = F.pixel_shuffle(x, r)  # (n, c_last, gh * r, gw * r)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            skips, block_skips = skips[:-n_skips], skips[-n_skips:]
            x = block(x, block_skips, timestep_embeds)  # sizes are exact multiples: plain 2x upsampling
        return self.conv_out(F.silu(self.norm_out(x)))  # (n, C_out, h, w)


__all__ = ["MonoFormerUNetPatchEncoder", "MonoFormerUNetPatchDecoder", "unet_head_features", "unet_residual_patch"]
